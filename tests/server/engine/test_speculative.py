"""Speculative decoding from the prompt (server/engine/speculative.py): drafting, the
verification rules, and the engine's output with speculation equal to its output without,
over mixed batches on the tiny model."""

import pytest
import torch

from lorag.adapters import Composition
from lorag.server.engine import SamplingParams
from lorag.server.engine.sampling import distribution
from lorag.server.engine.speculative import DraftState, Speculator, propose, verify
from lorag.server.engine.structured import Constraint

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
    speculator = Speculator(tokens=4, max_batch=8)
    state = DraftState()
    tokens = lambda: [1, 2, 3, 1, 2]  # noqa: E731
    assert speculator.draft(state, tokens, room=10, decoding=9) == []  # past max_batch
    assert speculator.draft(state, tokens, room=2, decoding=1) == [3, 1]  # room bounds it
    speculator.record(state, drafted=4, accepted=0)
    speculator.record(state, drafted=4, accepted=1)  # 1 of 8 kept: back off one step
    assert state.backoff == 1 and state.length == 2  # one more than it kept
    assert speculator.draft(state, tokens, room=10, decoding=1) == []
    assert speculator.draft(state, tokens, room=10, decoding=1) == [3, 1]
    speculator.record(state, drafted=2, accepted=2)
    assert state.backoff == 0 and state.length == 4  # kept whole: doubled, up to tokens
    assert (speculator.drafts, speculator.draft_tokens, speculator.accepted_tokens) == \
        (3, 10, 3)
    assert speculator.accepted_per_pos == [2, 1, 0, 0]


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
