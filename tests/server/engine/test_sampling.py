"""Constrained decoding, logprobs and penalties in the native engine, on the tiny model;
and the float32 logits reported logprobs are read from."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from lorag.errors import InvalidRequest
from lorag.server.engine import SamplingParams
from lorag.server.engine.runner import ModelRunner
from lorag.server.engine.sampling import penalize
from lorag.server.engine.structured import Constraint, Grammars
from tests.schemas import SCHEMAS, validate
from tests.tiny import tiny_model

PROMPT = [1, 4093, 198, 31530, 549, 253, 1789, 30]  # any ids do for random weights


def json_constraint(name: str) -> Constraint:
    return Constraint("json_schema", json.dumps(SCHEMAS[name]))


@pytest.mark.slow
def test_constrained_and_free_requests_on_different_adapters_share_steps(
        make_engine, adapter_root):
    engine = make_engine(start=False, max_num_seqs=16, max_active_adapters=4)
    adapters = [None, "t0", "t1", "t2", "t3"]
    for name in adapters[1:]:
        engine.load_adapter(name, str(adapter_root / name))
    free = SamplingParams(max_tokens=24)
    alone = {}
    for adapter in adapters:  # each free request by itself: the reference
        stream = engine.submit(PROMPT, free, adapter=adapter)
        while engine.running or engine.waiting:
            engine.step()
        alone[adapter] = stream.result().token_ids

    free_streams = {a: engine.submit(PROMPT, free, adapter=a) for a in adapters}
    constrained = [(name, engine.submit(PROMPT, SamplingParams(
        max_tokens=120, constraint=json_constraint(name)), adapter=adapter))
        for name, adapter in zip(SCHEMAS, adapters, strict=True)]
    engine.step()
    assert len(engine.running) == 10  # all of them in one batch from the first step on
    while engine.running or engine.waiting:
        engine.step()
    for adapter, stream in free_streams.items():
        assert stream.result().token_ids == alone[adapter]
    for name, stream in constrained:
        out = stream.result()
        assert out.finish_reason == "stop"
        validate(json.loads(out.text), SCHEMAS[name])


@pytest.mark.slow
def test_sampled_output_under_a_regex_matches_it_whole(make_engine):
    engine = make_engine()
    pattern = r"[A-Z]{2}-\d{3}( [a-z]{1,8})?"
    for seed in range(4):
        params = SamplingParams(max_tokens=20, temperature=1.0, seed=seed,
                                constraint=Constraint("regex", pattern))
        out = engine.submit(PROMPT, params).result()
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), out.text


def test_output_under_a_grammar_is_a_sentence_of_it(make_engine):
    grammar = 'root ::= "The answer is " answer "."\nanswer ::= "yes" | "no" | "maybe"'
    out = make_engine().submit(PROMPT, SamplingParams(
        max_tokens=20, constraint=Constraint("grammar", grammar))).result()
    assert re.fullmatch(r"The answer is (yes|no|maybe)\.", out.text), out.text


@pytest.mark.parametrize("kind, spec, reason", [
    ("json_schema", '{"type": "wat"}', 'Unsupported type "wat"'),
    ("json_schema", '{"$ref": "#/nowhere"}', "Cannot find field nowhere"),
    ("json_schema", "{not json", "not valid JSON"),
    ("json_schema", "[1, 2]", "must be a JSON object"),
    ("regex", "([a-z", "Unclosed '['"),
    ("grammar", "root ::= missing", 'Rule "missing" is not defined'),
    ("grammar", "  ", "the grammar is empty"),
    ("xml", "<a/>", "must be one of json_object, json_schema, regex, grammar"),
], ids=["unknown-type", "dangling-ref", "not-json", "not-an-object", "regex", "grammar",
        "empty", "unknown-kind"])
def test_a_constraint_that_cannot_compile_is_refused_at_submit(make_engine, kind, spec, reason):
    engine = make_engine()
    with pytest.raises(InvalidRequest) as refused:
        engine.submit(PROMPT, SamplingParams(constraint=Constraint(kind, spec)))
    assert refused.value.field == "response_format"
    assert reason in refused.value.message
    assert engine.occupancy()["waiting"] == 0  # nothing was queued


def test_a_grammar_compiled_again_is_a_cache_hit(tokenizer):
    grammars = Grammars(tokenizer, tokenizer.vocab_size, {2}, cache_bytes=4 << 20)
    assert grammars.cache_bytes() == 0  # the compiler is built by the first constraint
    first = grammars.compile(json_constraint("order"))
    size = grammars.cache_bytes()
    assert grammars.compile(json_constraint("order")) is not None
    assert grammars.cache_bytes() == size  # a hit, not a second copy
    assert first.memory_size_bytes > 0


def test_the_grammar_cache_keeps_within_its_budget(tokenizer):
    grammars = Grammars(tokenizer, tokenizer.vocab_size, {2}, cache_bytes=4 << 20)
    for i in range(40):  # distinct schemas: the least recently used leave
        grammars.compile(Constraint("json_schema", json.dumps(
            {"type": "object", "properties": {f"field{i}": {"type": "integer"}}})))
    assert grammars.cache_bytes() <= 4 << 20


@pytest.mark.slow
def test_logprobs_are_the_models_own_and_ordered(make_engine):
    engine = make_engine()
    out = engine.submit(PROMPT, SamplingParams(max_tokens=12, logprobs=5)).result()
    assert len(out.logprobs) == len(out.token_ids) == 12
    model = tiny_model()  # the engine's weights, run by transformers directly
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + out.token_ids[:-1]])).logits[0, len(PROMPT) - 1:]
    reference = torch.log_softmax(logits.float(), dim=-1)
    for position, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        expected = reference[position]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        ids = [token_id for token_id, _ in entry.top]
        values = [value for _, value in entry.top]
        assert ids == expected.topk(5).indices.tolist()
        assert values == sorted(values, reverse=True) and values[0] == entry.logprob  # greedy
        assert values == pytest.approx(expected.topk(5).values.tolist(), abs=1e-4)
        assert sum(torch.tensor(values).exp()) <= 1 + 1e-5


def test_logprobs_of_a_constrained_request_are_after_the_grammar_mask(make_engine):
    engine = make_engine()
    out = engine.submit(PROMPT, SamplingParams(max_tokens=4, logprobs=20, constraint=Constraint(
        "regex", "(yes|no|maybe)"))).result()
    first = out.logprobs[0]
    # only tokens the grammar allows are listed, and their probabilities sum to 1
    assert 1 <= len(first.top) < 20
    assert sum(torch.tensor([value for _, value in first.top]).exp()) == pytest.approx(1)


def test_penalties_are_applied_as_vllm_defines_them():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    untouched = logits.clone()
    penalize(logits, [SamplingParams(presence_penalty=0, frequency_penalty=0,
                                     repetition_penalty=1)], [([0, 1], [3, 3])])
    assert torch.equal(logits, untouched)  # 0, 0 and 1 change nothing, to the bit
    penalize(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25,
                                     repetition_penalty=2)], [([0, 1], [3, 3, 2])])
    # token 0 (prompt): 2 / 2; token 1 (prompt): -1 * 2; token 2 (output once): 0.5 / 2 -
    # (0.25 + 0.5); token 3 (output twice): 3 / 2 - (0.5 + 0.5); token 4: unseen
    assert logits.tolist() == [[1.0, -2.0, -0.5, 0.5, 0.0]]


def repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


@pytest.mark.slow
def test_penalties_change_greedy_output_in_their_direction(make_engine):
    engine = make_engine()

    def run(**penalties) -> list[int]:
        params = SamplingParams(max_tokens=40, ignore_eos=True, **penalties)
        return engine.submit(PROMPT, params).result().token_ids

    plain = run()
    assert run(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0) == plain
    assert repeats(plain) > 5  # the tiny model repeats itself: room to move either way
    assert repeats(run(frequency_penalty=2.0)) < repeats(plain)
    assert repeats(run(presence_penalty=2.0)) < repeats(plain)
    assert repeats(run(repetition_penalty=2.0)) < repeats(plain)
    assert repeats(run(presence_penalty=-2.0)) > repeats(plain)



def test_reported_logprobs_come_from_float32_logits_on_a_bf16_head():
    """The rows whose log-probabilities are reported get their logits recomputed in
    float32: a bf16 head's output moves in steps of 0.125 near 16, which tied a
    reranker's yes/no odds."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 20_000, bias=False).to(torch.bfloat16)
    runner = SimpleNamespace(model=SimpleNamespace(lm_head=head))
    last = (torch.randn(3, 64) * 4).to(torch.bfloat16)
    with torch.no_grad():
        coarse = head(last).float()
        logits = coarse.clone()
        ModelRunner._precise_logits(runner, logits, last, torch.tensor([1]))
        exact = last.float() @ head.weight.float().T
    torch.testing.assert_close(logits[1], exact[1], rtol=0, atol=1e-5)
    assert torch.equal(logits[0], coarse[0])  # rows not asked stay as they were
    assert (coarse[1] - exact[1]).abs().max() > 1e-2  # what the bf16 head rounded away
