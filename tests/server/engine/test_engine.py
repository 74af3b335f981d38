"""Engine behaviour on the tiny model: streaming, hot-load, cancellation, limits, sampling."""

import asyncio
import threading

import pytest
import torch

from lorag.errors import InvalidRequest, Overloaded
from lorag.server.backend import BATCH_PRIORITY, Backend
from lorag.server.engine import SamplingParams
from lorag.server.engine.config import Limits, kv_bytes_per_token
from tests.tiny import tiny_model

PROMPT = [1, 2, 3, 4]


def test_the_native_engine_is_a_backend(make_engine, adapter_root):
    engine = make_engine()
    assert isinstance(engine, Backend)  # every method of the interface is there
    assert engine.limits == Limits(max_model_len=128, max_lora_rank=16, max_active_adapters=2,
                                   adapter_roots=(adapter_root.resolve(),), vocab_size=49152)
    assert engine.occupancy() == {"running": 0, "waiting": 0, "kv_slots_free": 8,
                                  "kv_cache_usage": 0.0, "evictions": 0, "slot_loads": 0,
                                  "prefix_cache_queries": 0, "prefix_cache_hits": 0,
                                  "running_adapters": [], "waiting_adapters": []}
    assert engine.describe() == ("native engine on cpu, torch.float32, torch attention, "
                                 "prefix caching on, KV cache 0.5 MiB (32 blocks: 1024 "
                                 "tokens, 8.0 sequences of 128)")


def test_occupancy_names_the_adapters_of_running_and_waiting_requests(make_engine):
    """Three adapters on two adapter slots: two run, the third waits for a slot; the KV
    cache is used by the running sequences' blocks."""
    engine = make_engine(start=False)
    for name in ("t0", "t1", "t2"):
        engine.load_adapter(name, str(engine.config.adapter_roots[0] / name))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for name in ("t0", "t1", "t0", None, "t2"):
        engine.submit(PROMPT, params, adapter=name)
    engine.step()
    occupancy = engine.occupancy()
    assert occupancy["running_adapters"] == ["t0", "t1"]  # each once
    assert occupancy["waiting_adapters"] == ["t2"]  # no slot free for it
    assert occupancy["running"] == 4 and occupancy["waiting"] == 1
    # one 32-token block each (4 prompt + 8 new tokens), of 8 sequences x 4 blocks
    assert occupancy["kv_cache_usage"] == 4 / 32


@pytest.mark.slow
def test_hot_load_during_a_stream_neither_stalls_nor_changes_it(make_engine, adapter_root):
    engine = make_engine()
    engine.load_adapter("t0", str(adapter_root / "t0"))
    params = SamplingParams(max_tokens=120, ignore_eos=True)
    solo = engine.submit(PROMPT, params, adapter="t0").result().token_ids

    stream = iter(engine.submit(PROMPT, params, adapter="t0"))
    first = next(stream)  # the stream is running
    assert engine.load_adapter("t1", str(adapter_root / "t1")) is True
    hot = iter(engine.submit(PROMPT, SamplingParams(max_tokens=2, ignore_eos=True),
                             adapter="t1"))
    assert next(hot).token_ids  # the new adapter's first token...
    assert engine.stats()["running"] >= 1  # ...arrives while the first stream still runs
    rest = [out for out in stream]
    tokens = first.token_ids + [t for out in rest for t in out.token_ids]
    assert tokens == solo
    assert rest[-1].finish_reason == "length"


@pytest.mark.slow
def test_an_adapter_out_of_ram_is_reread_by_the_caller_not_the_step_loop(
        make_engine, adapter_root):
    engine = make_engine(max_cpu_adapter_bytes=1)  # the RAM tier keeps only the newest
    for name in ("t0", "t1", "t2"):
        engine.load_adapter(name, str(adapter_root / name))
    assert engine.registry.names() == ["t0", "t1", "t2"]
    assert [engine.registry.in_ram(n) for n in ("t0", "t1", "t2")] == [False, False, True]
    readers = []
    read = engine.registry.get
    engine.registry.get = lambda name: readers.append(threading.current_thread().name) \
        or read(name)
    out = engine.submit(PROMPT, SamplingParams(max_tokens=3), adapter="t0").result()
    assert out.finish_reason in ("length", "stop") and out.error is None
    assert readers == ["MainThread"]  # read at submit; the loop installed what it was given
    assert engine.stats()["adapter_slots"][0] == "t0"


def test_cancel_frees_kv_and_adapter_slots(make_engine, adapter_root):
    engine = make_engine(start=False)
    engine.load_adapter("t0", str(adapter_root / "t0"))
    stream = engine.submit(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True),
                           adapter="t0", request_id="r1")
    engine.step()
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["adapter_refs"] == [1, 0]
    assert engine.cancel("r1") is True
    engine.step()
    stats = engine.stats()
    assert stats["running"] == 0 and stats["kv_slots_free"] == 8
    assert stats["adapter_refs"] == [0, 0]
    outputs = list(stream)
    assert outputs[-1].finish_reason == "cancelled"
    assert engine.cancel("r1") is False


@pytest.mark.slow
def test_a_kv_cache_budget_sizes_the_cache_and_what_does_not_fit_waits(make_engine):
    """--kv-cache-memory: the blocks a budget holds on this model; requests beyond them
    wait for blocks (never an allocation failure) and all finish; a budget below one
    max_model_len sequence is refused at start, naming the option."""
    token_bytes = kv_bytes_per_token(tiny_model().config, torch.float32)
    engine = make_engine(start=False, kv_cache_memory=8 * 32 * token_bytes + 1)
    assert engine.config.kv_blocks == 8  # two sequences of 4 blocks (128 tokens)
    assert engine.runner.kv_cache.shape[1] == 8
    params = SamplingParams(max_tokens=120, ignore_eos=True)  # 124 tokens: 4 blocks each
    streams = [engine.submit(PROMPT, params) for _ in range(4)]
    engine.step()
    occupancy = engine.occupancy()
    assert (occupancy["running"], occupancy["waiting"]) == (2, 2)
    while engine.stats()["waiting"] or engine.stats()["running"]:
        engine.step()
    results = [stream.result() for stream in streams]
    assert [(r.finish_reason, len(r.token_ids)) for r in results] == [("length", 120)] * 4
    with pytest.raises(InvalidRequest, match="kv_cache_memory 0 MiB cannot hold one "
                                             "sequence of max_model_len 128 tokens"):
        make_engine(start=False, kv_cache_memory=3 * 32 * token_bytes)
    with pytest.raises(InvalidRequest, match="give num_kv_blocks .--num-kv-blocks. or"):
        make_engine(start=False, kv_cache_memory=1 << 30, num_kv_blocks=8)


def test_full_queue_is_overloaded_and_loses_nothing(make_engine):
    engine = make_engine(start=False, max_waiting=2)
    streams = [engine.submit(PROMPT, SamplingParams(max_tokens=2)) for _ in range(2)]
    with pytest.raises(Overloaded, match="queue is full .2 requests waiting.; retry later"):
        engine.submit(PROMPT)
    while engine.stats()["waiting"] or engine.stats()["running"]:
        engine.step()
    assert all(s.result().finish_reason in ("length", "stop") for s in streams)


@pytest.mark.parametrize(("prompt", "params", "message"), [
    (list(range(1, 101)), {"max_tokens": 50}, "maximum context length is 128 tokens; the "
                                              "request has 100 prompt tokens and asks for 50 more"),
    ([], {}, "prompt is empty"),
], ids=["past-the-context", "empty-prompt"])
def test_a_prompt_the_engine_cannot_take_is_refused_at_submit(make_engine, prompt, params,
                                                              message):
    with pytest.raises(InvalidRequest, match=message):
        make_engine(start=False).submit(prompt, SamplingParams(**params))


@pytest.mark.parametrize(("params", "message"), [
    ({"max_tokens": -3}, "max_tokens must be an integer >= 1, got -3"),
    ({"top_p": 1.5}, "top_p must be a number in .0, 1., got 1.5"),
], ids=["max_tokens", "top_p"])
def test_sampling_parameters_out_of_range_are_refused_naming_the_range(params, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**params)


@pytest.mark.slow
def test_a_seeded_request_samples_the_same_tokens_whatever_runs_beside_it(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7,
                            ignore_eos=True)
    alone = engine.submit(PROMPT, params).result().token_ids
    crowd = [engine.submit(PROMPT, SamplingParams(max_tokens=16, temperature=1.0,
                                                  ignore_eos=True)) for _ in range(4)]
    again = engine.submit(PROMPT, params).result().token_ids
    [s.result() for s in crowd]
    assert alone == again


def test_stop_strings_end_the_output_and_are_not_included(make_engine, tokenizer):
    engine = make_engine()
    free = engine.submit(PROMPT, SamplingParams(max_tokens=30, ignore_eos=True)).result()
    assert len(free.text) > 6
    stop = free.text[3:6]
    stopped = engine.submit(PROMPT, SamplingParams(max_tokens=30, ignore_eos=True,
                                                   stop=[stop])).result()
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:free.text.find(stop)]


def test_async_streaming_from_an_event_loop(make_engine):
    engine = make_engine()

    async def collect():
        stream = engine.submit(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
        return [out async for out in stream]

    outputs = asyncio.run(collect())
    assert len(outputs) == 8 and outputs[-1].finish_reason == "length"
    assert outputs[-1].completion_tokens == 8 and outputs[-1].prompt_tokens == 4


@pytest.mark.slow
def test_the_model_stays_a_working_model_and_a_second_engine_serves_it(make_engine,
                                                                        tokenizer,
                                                                        adapter_root):
    """The engine fuses q/k/v and gate/up without wrapping the model's modules: they stay
    plain Linear layers whose weights are views of the fused weight (held once), the model
    computes what it did, and a new engine on it serves the same tokens."""
    import torch
    from torch import nn

    from lorag.server.engine import Engine

    first = make_engine(start=False)
    model = first.runner.model
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        before = model(ids).logits
    first.start()
    first.load_adapter("t0", str(adapter_root / "t0"))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = first.submit(PROMPT, params, adapter="t0").result().token_ids
    first.shutdown()
    with Engine(model, tokenizer, first.config) as second:
        attention = model.model.layers[0].self_attn
        assert type(attention.q_proj) is nn.Linear and type(attention.v_proj) is nn.Linear
        fused = second.runner.projections[0]["qkv"].base
        assert attention.q_proj.weight.data_ptr() == fused.weight.data_ptr()
        with torch.inference_mode():
            torch.testing.assert_close(model(ids).logits, before)
        second.load_adapter("t0", str(adapter_root / "t0"))
        assert second.submit(PROMPT, params).result().token_ids
        assert second.submit(PROMPT, params, adapter="t0").result().token_ids == want


def test_a_waiting_interactive_request_is_admitted_before_waiting_batch_lines(make_engine):
    """One sequence at a time: batch lines queued first still wait behind an interactive
    request queued after them (FIFO within a priority)."""
    engine = make_engine(start=False, max_num_seqs=1)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    order = ["busy", "batch-1", "batch-2", "chat-1", "chat-2"]
    streams = {name: engine.submit(PROMPT, params, request_id=name,
                                   priority=BATCH_PRIORITY if "batch" in name else 0)
               for name in order}
    assert [seq.id for seq in engine.waiting] == ["busy", "chat-1", "chat-2", "batch-1",
                                                  "batch-2"]
    ended, lock = [], threading.Lock()

    def read(name: str) -> None:
        streams[name].result()
        with lock:
            ended.append(name)

    readers = [threading.Thread(target=read, args=(name,)) for name in order]
    for reader in readers:
        reader.start()
    engine.start()
    for reader in readers:
        reader.join(timeout=60)
    assert ended == ["busy", "chat-1", "chat-2", "batch-1", "batch-2"]


def test_batch_lines_sit_out_the_steps_that_prefill_an_interactive_request(make_engine):
    engine = make_engine(start=False, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    line = engine.submit(PROMPT, params, request_id="line", priority=BATCH_PRIORITY)
    engine.step()  # the line's prompt, and its first token
    (running,) = engine.running
    assert len(running.output_ids) == 1
    engine.submit(list(range(1, 41)), params, request_id="chat")  # 40 tokens: 3 chunks
    for _ in range(3):
        engine.step()
        assert len(running.output_ids) == 1  # waiting while the chat prefills
    engine.step()  # both decode again
    assert len(running.output_ids) == 2
    chat = next(seq for seq in engine.running if seq.id == "chat")
    assert len(chat.output_ids) == 2
    engine.cancel("line"), engine.cancel("chat")
    engine.step()
    assert line.result().finish_reason == "cancelled"
