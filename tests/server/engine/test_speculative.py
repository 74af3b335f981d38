"""Speculative decoding from the prompt (server/engine/speculative.py): drafting, the
verification rules, and the engine's output with speculation equal to its output without,
over mixed batches on the tiny model."""

import numpy as np
import pytest
import torch

from lorag.adapters import Composition
from lorag.server.engine import SamplingParams
from lorag.server.engine.sampling import distribution
from lorag.server.engine.speculative import (
    MAX_NGRAM,
    DraftState,
    History,
    Speculator,
    propose,
    verify,
)
from lorag.server.engine.structured import (
    Constraint,
    Grammars,
    grammar_prefix,
    mask_drafted,
)

# a prompt that repeats itself, as a RAG answer repeats its passages: lookups find it
PASSAGE = [101, 202, 303, 404, 505, 606, 707, 808]
PROMPT = [1, *PASSAGE, 9, *PASSAGE[:3]]


def test_propose_takes_what_followed_the_latest_occurrence_of_the_longest_tail():
    assert propose([5, 6, 7, 1, 2, 9, 1, 2, 3, 8, 1, 2], 3) == [3, 8, 1]  # latest "1 2"
    assert propose([4, 1, 2, 3, 7, 2, 3, 9, 5, 2, 3], 2) == [9, 5]  # no earlier "5 2 3"
    assert propose([4, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # the 3-gram "1 2 3"
    assert propose([1, 2, 3, 4], 4) == []  # nothing repeats
    assert propose([7, 8, 7], 5) == [8, 7]  # what is there, up to k
    assert propose([7], 3) == [] and propose([7, 7], 0) == []


def test_a_sequence_drafts_from_other_outputs_where_they_match_a_longer_tail():
    other = [np.array([3, 4, 5, 6, 7])]
    assert propose([1, 2, 4, 5], 3, elsewhere=other) == [6, 7]  # its own context: nothing
    # "1 2" occurs only in the other output: the longer tail wins over its own "2 9"
    assert propose([5, 2, 9, 1, 2], 2, elsewhere=[np.array([1, 2, 6])]) == [6]
    # the same tail length in both: its own context first
    assert propose([2, 9, 5, 2], 2, elsewhere=[np.array([2, 7])]) == [9, 5]
    # the outputs in the order given (latest first)
    assert propose([1, 3], 1, elsewhere=[np.array([3, 4]), np.array([3, 5])]) == [4]
    assert propose([1, 3], 1, elsewhere=[np.array([3])]) == []  # nothing after it


def test_history_keeps_the_latest_outputs_of_the_keys_used_last():
    history = History(per_key=2, tokens=3, keys=2)
    prompt = list(range(100, 100 + MAX_NGRAM + 2))
    history.remember("a", prompt, [1, 2, 3, 4])
    assert [x.tolist() for x in history.of("a")] == [prompt[-MAX_NGRAM:] + [1, 2, 3]]
    history.remember("a", prompt, [5])
    history.remember("a", prompt, [6])
    assert [x[-1] for x in history.of("a")] == [6, 5]  # the latest first, per_key of them
    history.remember("a", prompt, [])  # an empty output is not kept
    assert len(history.of("a")) == 2
    history.remember("b", prompt, [7])
    history.remember("a", prompt, [8])  # "a" used last again
    history.remember("c", prompt, [9])  # past 2 keys: "b" goes
    assert list(history.outputs) == ["a", "c"] and list(history.of("b")) == []
    assert list(history.of(None)) == []


def test_greedy_verification_keeps_the_drafts_the_argmax_agrees_with():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 9, 1]):
        logits[row, best] = 5.0
    greedy = SamplingParams(temperature=0)
    assert verify(logits, [3, 4, 5], greedy, None) == [3, 4, 9]  # the third corrected
    assert verify(logits, [3, 4, 9], greedy, None) == [3, 4, 9, 1]  # all kept, one more
    assert verify(logits, [2, 4, 9], greedy, None) == [3]  # the first rejected


@pytest.mark.slow
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_p=0.8),
                                    SamplingParams(temperature=1.3, top_k=3)],
                         ids=["plain", "top-p", "top-k"])
def test_the_rejection_rule_leaves_the_distribution_as_it_was(params):
    """Whatever the draft, the first emitted token is distributed as the request's own
    sampling would draw it: a chi-square test over 20 000 draws on a 6-token vocabulary,
    for a likely, an unlikely and an excluded draft."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [0.0] * 6])
    expected = distribution(logits[0], params)
    generator = torch.Generator().manual_seed(0)
    draws = 20_000
    for draft in (0, 3, 5):
        counts = torch.zeros(6)
        for _ in range(draws):
            counts[verify(logits, [draft], params, generator)[0]] += 1
        support = expected > 0
        assert counts[~support].sum() == 0  # nothing outside top-k / top-p
        chi2 = (((counts - draws * expected) ** 2)[support] / (draws * expected[support])).sum()
        # 5 degrees of freedom at most: p = 0.001 at 20.5
        assert chi2 < 20.5, (draft, counts / draws, expected)


def test_drafts_follow_acceptance_back_off_and_stop_in_a_full_batch():
    speculator = Speculator(tokens=8, max_batch=8)
    state = DraftState()
    tokens = lambda: [1, 2, 3, 1, 2]  # noqa: E731
    assert speculator.draft(state, tokens, room=10, decoding=9) == []  # past max_batch
    assert speculator.draft(state, tokens, room=2, decoding=1) == [3, 1]  # room bounds it
    speculator.record(state, drafted=4, accepted=0)
    speculator.record(state, drafted=4, accepted=1)  # 1 of 8 kept: back off one step
    assert state.backoff == 1 and state.length == 4  # never below its first length
    assert speculator.draft(state, tokens, room=10, decoding=1) == []
    assert speculator.draft(state, tokens, room=10, decoding=1) == [3, 1, 2]
    speculator.record(state, drafted=3, accepted=3)
    assert state.backoff == 0 and state.length == 6  # kept whole: doubled, up to tokens
    assert (speculator.drafts, speculator.draft_tokens, speculator.accepted_tokens) == \
        (3, 11, 4)
    assert speculator.accepted_per_pos == [2, 1, 1, 0, 0, 0, 0, 0]
    speculator.record(state, drafted=6, accepted=5)
    assert state.length == 6  # rejected: one more than it kept


def mixed_batch(engine, adapter_root) -> list:
    """One batch of every kind of request, submitted together, their outputs in order."""
    for name in ("t0", "t1"):
        engine.load_adapter(name, str(adapter_root / name))
    both = Composition((("t0", 0.5), ("t1", 0.5)))
    greedy = SamplingParams(max_tokens=48, ignore_eos=True)
    requests = [
        (PROMPT, greedy, None), (PROMPT, greedy, "t0"), (PROMPT[2:], greedy, "t1"),
        (PROMPT, greedy, both),
        (PROMPT, SamplingParams(max_tokens=24, stop=["x"], ignore_eos=True), "t0"),
        (PROMPT, SamplingParams(max_tokens=24, logprobs=2, ignore_eos=True), None),
        (PROMPT, SamplingParams(max_tokens=24, repetition_penalty=1.3), "t1"),
        (PROMPT, SamplingParams(max_tokens=24, constraint=Constraint("regex", "[a-z ]+"),
                                ignore_eos=True), None),
        (PROMPT, SamplingParams(max_tokens=24, temperature=0.8, seed=7), None),
    ]
    streams = [engine.submit(prompt, params, adapter=adapter)
               for prompt, params, adapter in requests]
    return [stream.result() for stream in streams]


@pytest.mark.slow
def test_greedy_output_is_the_same_with_speculation_over_a_mixed_batch(make_engine,
                                                                       adapter_root):
    """Base, adapters, a composition, a stop string, logprobs, penalties, a grammar and a
    seeded sampled request in one batch: every greedy output equal token for token with
    and without speculation (the requests that do not draft are the same by
    construction); drafts were made and kept."""
    plain = mixed_batch(make_engine(), adapter_root)
    fast_engine = make_engine(speculative_tokens=4)
    fast = mixed_batch(fast_engine, adapter_root)
    for index, (without, with_) in enumerate(zip(plain, fast, strict=True)):
        if index == 8:  # sampled: the same distribution, not the same draws
            continue
        assert with_.token_ids == without.token_ids, index
        assert with_.finish_reason == without.finish_reason, index
        for a, b in zip(with_.logprobs or [], without.logprobs or [], strict=True):
            # the batch around a row changes its arithmetic in the last bits, not its tokens
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    speculator = fast_engine.speculator
    assert speculator.draft_tokens > 0 and speculator.accepted_tokens > 0
    names = [family.name for family in fast_engine.metric_families()]
    assert "vllm:spec_decode_num_accepted_tokens" in names


def test_a_request_drafts_from_earlier_outputs_of_its_own_history_key_alone(make_engine):
    """A request drafts its answer from an earlier request's output of its history key
    (the same prompt, greedy: the same answer) and answers as without drafts; a request
    of another key (another tenant's, in the daemon) drafts nothing from it."""
    prompt = list(range(300, 340))  # nothing repeats: its own context drafts nothing
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = make_engine().submit(prompt, greedy).result().token_ids
    engine = make_engine(speculative_tokens=8)
    speculator = engine.speculator

    def accepted(history) -> int:
        before = speculator.accepted_tokens
        assert engine.submit(prompt, greedy, history=history).result().token_ids == plain
        return speculator.accepted_tokens - before

    own = accepted(("acme", None))  # what its own output's repeats give
    assert accepted(("beta", None)) == own  # acme's output is not beta's history
    # the first two steps draft 4 and then 8 tokens of acme's earlier output, all kept
    assert accepted(("acme", None)) >= 12 > own
    assert len(speculator.history.of(("acme", None))) == 2


ANSWER = Constraint.of_schema({"type": "object", "properties": {"answer": {"type": "string"}},
                               "required": ["answer"], "additionalProperties": False})


def test_drafts_are_cut_where_the_grammar_refuses_them_and_rows_masked_by_its_state(
        tokenizer):
    grammars = Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    matcher = grammars.matcher(ANSWER)
    answer = tokenizer.encode('{"answer": "hi"}')
    eos = tokenizer.eos_token_id
    # a stop token ends what the grammar takes; a token the grammar refuses cuts the rest
    assert grammar_prefix(matcher, [*answer, eos, *answer]) == [*answer, eos]
    assert grammar_prefix(matcher, [answer[0], eos, answer[1]]) == [answer[0]]
    assert grammar_prefix(matcher, answer[1:]) == []  # not how a JSON object begins
    logits = torch.zeros(3, len(tokenizer))
    mask_drafted(logits, grammars.bitmask(3), matcher, answer[:2])
    allowed = [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in logits]
    assert answer[0] in allowed[0] and answer[1] not in allowed[0]
    assert answer[1] in allowed[1] and answer[0] not in allowed[1]
    assert answer[2] in allowed[2]
    assert matcher.accept_token(answer[0])  # the matcher is where it was: at the start


def test_a_constrained_request_drafts_within_its_grammar(make_engine):
    """A JSON-schema request drafts from an earlier answer of its history key, and
    answers as it does without speculation."""
    prompt = list(range(300, 340))
    params = SamplingParams(max_tokens=24, constraint=ANSWER)
    plain = make_engine().submit(prompt, params).result().token_ids
    engine = make_engine(speculative_tokens=8)
    assert engine.submit(prompt, params, history="k").result().token_ids == plain
    before = engine.speculator.accepted_tokens
    assert engine.submit(prompt, params, history="k").result().token_ids == plain
    assert engine.speculator.accepted_tokens - before >= len(plain) // 2  # most, by drafts
