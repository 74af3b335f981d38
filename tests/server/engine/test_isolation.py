"""One request cannot end another's: input that would break a step is refused at submit,
and a step that fails anyway (a fault injected into one row: it raises, or its logits go
NaN, mid-decode) ends only that request, while every other request of a full batch of
mixed adapters produces exactly the tokens it produces alone. A step loop that dies
ends every stream with an error at once and refuses new work."""

import time

import pytest
import torch

from lorag.adapters import Composition
from lorag.errors import InvalidRequest, RequestFailed, Unavailable
from lorag.server.engine import SamplingParams
from lorag.server.engine.structured import Constraint

PROMPT = [1, 2, 3, 4]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9, seed=7)
# a full batch (the engine's max_num_seqs) of mixed adapters, one of them seeded sampling
BATCH = [(None, GREEDY), ("t0", GREEDY), ("t1", GREEDY), ("t2", SEEDED), ("t0", SEEDED),
         (Composition((("t0", 0.5), ("t1", 0.5))), GREEDY), ("t3", GREEDY), (None, SEEDED)]
VICTIMS = {1, 3}  # the requests the fault strikes (greedy, seeded) once they have 3 tokens


@pytest.fixture
def engine(make_engine, adapter_root):
    engine = make_engine(max_num_seqs=len(BATCH), max_active_adapters=6)
    for name in ("t0", "t1", "t2", "t3"):
        engine.load_adapter(name, str(adapter_root / name))
    return engine


def prompts() -> list[list[int]]:
    return [PROMPT + [10 + i] for i in range(len(BATCH))]  # distinct: no shared prefix


def alone(engine) -> list[list[int]]:
    """Each request of BATCH run on its own: the tokens it must produce in the batch."""
    return [engine.submit(prompt, params, adapter).result().token_ids
            for prompt, (adapter, params) in zip(prompts(), BATCH, strict=True)]


def strike(engine, fault):
    """Run BATCH together with `fault(sampled_row_index, logits)` applied to the victims'
    rows from their fourth token on; returns the streams."""
    streams = [engine.submit(prompt, params, adapter, request_id=f"r{i}")
               for i, (prompt, (adapter, params)) in enumerate(zip(prompts(), BATCH,
                                                                   strict=True))]

    def hook(sampled, logits):
        for row, seq in enumerate(sampled):
            if int(seq.id[1:]) in VICTIMS and len(seq.output_ids) >= 3:
                fault(row, logits)

    engine.fault_hook = hook
    return streams


def raise_(row, logits):
    raise RuntimeError("index out of range in self (injected)")


def poison(row, logits):
    with torch.inference_mode():  # logits are an inference tensor
        logits[row] = float("nan")


@pytest.mark.slow
@pytest.mark.parametrize("fault", [raise_, poison], ids=["row-raises", "row-goes-nan"])
def test_a_failing_row_ends_its_request_alone(engine, fault):
    expected = alone(engine)
    streams = strike(engine, fault)
    for i, stream in enumerate(streams):
        if i in VICTIMS:
            with pytest.raises(RequestFailed) as failed:
                stream.result()
            assert f"request r{i}" in failed.value.message
            assert "index out of range" not in failed.value.message  # the log has it
        else:
            assert stream.result().token_ids == expected[i], f"request {i}"
    engine.fault_hook = None
    for i in VICTIMS:  # a healthy engine after: the victims alone, as before
        adapter, params = BATCH[i]
        assert engine.submit(prompts()[i], params, adapter).result().token_ids == expected[i]
    assert engine.alive and engine.stats()["running"] == 0 and engine.kv.used == 0


def test_out_of_range_token_ids_are_refused_at_submit(engine):
    vocab = engine.limits.vocab_size
    for bad in ([vocab], [-1], [2**63 - 1], [1, 2, 10**30]):
        with pytest.raises(InvalidRequest, match=r"prompt\[\d\] is .*in \[0, 49152\)"):
            engine.submit(bad, GREEDY)
    assert engine.submit([vocab - 1], GREEDY).result().token_ids


@pytest.mark.slow
def test_a_tiny_temperature_is_greedy(engine):
    greedy = engine.submit(PROMPT, GREEDY).result().token_ids
    tiny = SamplingParams(max_tokens=12, ignore_eos=True, temperature=1e-40, seed=1)
    assert engine.submit(PROMPT, tiny).result().token_ids == greedy


def test_an_adapter_that_fails_to_install_ends_its_own_request_alone(engine, adapter_root,
                                                                    monkeypatch):
    """A bad file or a bug while copying one adapter into a compute slot (here the third
    layer's copy raises: half installed) fails that request with lorag's own error; a
    stream beside it runs on, and the slot, wiped, serves the same adapter exactly later."""
    expected = engine.submit(PROMPT, GREEDY, "t1").result().token_ids
    engine.unload_adapter("t1")  # out of its slot: the next request installs it again
    engine.load_adapter("t1", str(adapter_root / "t1"))
    beside = iter(engine.submit(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True), "t0"))
    first = next(beside).token_ids  # running: its adapter is in its slot
    copies = []

    def copy(real):
        def install(slot, a, b, magnitude=None):
            if any(part is not None for part in a):
                copies.append(slot)
                if len(copies) == 3:
                    raise RuntimeError("a copy that fails (injected)")
            real(slot, a, b, magnitude)
        return install

    with monkeypatch.context() as patch:
        for layer in engine.pool.layers:
            patch.setattr(layer, "install", copy(layer.install))
        with pytest.raises(RequestFailed, match=r"adapter 't1' could not be put in a "
                                                r"compute slot for request .*Other requests "
                                                r"were not affected"):
            engine.submit(PROMPT, GREEDY, "t1").result()
    assert len(first + [t for out in beside for t in out.token_ids]) == 40 and engine.alive
    assert engine.submit(PROMPT, GREEDY, "t1").result().token_ids == expected


def test_a_dead_step_loop_ends_every_stream_and_refuses_new_work(engine):
    long = SamplingParams(max_tokens=100, ignore_eos=True)
    streams = [iter(engine.submit(PROMPT, long, adapter)) for adapter in (None, "t0")]
    assert all(next(stream).token_ids for stream in streams)  # both running

    def broken():
        raise AssertionError("a bug in the scheduler (injected)")

    engine._update_merge = broken  # runs every step, outside any one request's rows
    start = time.monotonic()
    for stream in streams:
        last = list(stream)[-1]
        assert last.finish_reason == "error" and isinstance(last.error, Unavailable)
        assert "the engine stopped after an internal error" in str(last.error)
    assert time.monotonic() - start < 5
    assert not engine.alive and isinstance(engine.failure, AssertionError)
    with pytest.raises(Unavailable):
        engine.submit(PROMPT, GREEDY)
    with pytest.raises(Unavailable):  # work for the loop fails at once, never hangs
        engine.pin_adapter("t0")


@pytest.mark.slow
def test_a_grammar_past_the_compile_budget_is_refused_while_others_stream(make_engine):
    """xgrammar compiles `[a-z0-9]{0,4000}` in seconds here; with a 0.2 s budget the
    request gets a 400, the same grammar again gets it at once, other constraints still
    compile, and a stream beside them runs on."""
    engine = make_engine(grammar_compile_s=0.2)
    beside = engine.submit("Count on.", SamplingParams(max_tokens=40, ignore_eos=True))
    slow = SamplingParams(max_tokens=4, constraint=Constraint("regex", "[a-z0-9]{0,4000}"))
    for _ in range(2):
        with pytest.raises(InvalidRequest, match=r"the regex takes longer than 0.2 s to "
                                                 r"compile \(the daemon's --grammar-compile-s"):
            engine.submit("Write.", slow)
    quick = SamplingParams(max_tokens=4, constraint=Constraint("regex", "(ab)+"))
    assert engine.submit("Write.", quick).result().text.startswith("ab")
    assert len(beside.result().token_ids) == 40 and engine.alive
