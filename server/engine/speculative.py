"""Speculative decoding from the prompt (prompt lookup: vLLM's `ngram` method).

An answer grounded in retrieved passages copies spans of them. So before a step, a
decoding sequence whose last few tokens also occur earlier in its own context (the
passages, the question, its output so far) drafts the tokens that followed there
(`propose`). The step then runs those k drafts behind the sequence's last token as one
k+1-token chunk, which gives the target's logits after each of them at once, and
`verify` keeps the longest prefix the target agrees with plus one token of its own: up to
k+1 tokens for one forward pass, whose cost on a CPU is mostly reading the weights once.

Verification is exact. Greedy: a draft is kept while it is the argmax, so the output is
the one decoding without drafts gives (up to ties the chunk's different arithmetic can
break in the last bit). Sampled: the standard rejection rule for a draft that is one
token with certainty: draft d is kept with probability p(d) under the request's own
distribution (temperature, top-k, top-p); on rejection the token is drawn from p with d
removed, renormalized, which leaves every token's probability exactly p.

An answer also repeats its own form: the demo's adapter answers every question in one JSON
shape, whose keys and punctuation are half its tokens and occur nowhere in the prompt. So
a sequence also looks up its tail in the recent outputs of requests that share its
`history` key (`History`: the service gives the tenant and the adapter, so no tenant's
drafts come from another's outputs), as suffix decoding does (Oliaro et
al. 2024; vLLM's `suffix` method, whose suffix trees come from the arctic-inference
package: source only on PyPI, built with CMake, and a plugin that patches any vLLM in the
same environment; lorag looks up the few outputs it keeps with the same n-gram match
instead). The longest tail (up to 6 tokens) that occurs anywhere wins; on a tie the
sequence's own context comes first. On the demo's questions this took the format
adapter's single-stream decode from 1.3x to 2.0-2.5x (docs/engine.md).

Which requests draft (`speculable`): not penalized (each row's penalties would depend on
the drafts before it), not asking for logprobs, and without a prompt-tuning adapter's
virtual tokens. The others decode one token a step as before, in the same batches. A
request constrained by a grammar drafts too, where a JSON schema's keys and punctuation
make drafts most likely to be kept: its drafts are cut where its grammar would refuse
them (`grammar_prefix` in server/engine/structured.py), and each of its verify rows is
masked by the grammar's state after the drafts before it (`mask_drafted`), so the
target's distribution at every row is the one the request samples from.

`Speculator` keeps it adaptive. A sequence drafts as far as its drafts have lately been
kept: it starts at 4 tokens (or `tokens`, if fewer), doubles up to `tokens` after a
draft kept whole, and drops to one more than it kept after a rejection, never below 4 (a
rejected draft is often followed by a run of its answer's form); one whose drafts
keep being rejected backs off (drafts every 2nd, 4th, ... step). A step with more than
`max_batch` decoding sequences drafts nothing: a batch that full is compute-bound, and
extra verified tokens would cost throughput (measured: 8 streams through the NF4
default model lost 19% with drafts at 8 sequences).
"""

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from prometheus_client.core import CounterMetricFamily

from lorag.server.engine.sampling import SamplingParams, distribution

MAX_NGRAM, MIN_NGRAM = 6, 1  # the tail lengths looked up, longest first
MAX_BATCH = 4  # decoding sequences beyond which a step drafts nothing
FIRST_LENGTH = 4  # a sequence's first draft, at most
# a sequence's drafts are judged once this many tokens were drafted for it ...
JUDGED_AFTER = 8
LOW_ACCEPTANCE = 0.3  # ... and back off below this share accepted
MAX_BACKOFF = 16  # steps without drafting, at most


def propose(tokens: list[int], k: int, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM,
            elsewhere: Iterable[np.ndarray] = ()) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of `tokens`' last n tokens
    (the longest n in max_n..min_n that occurs), in `tokens` itself or in one of
    `elsewhere` (other outputs, latest first; on equal n, `tokens` first, then
    `elsewhere` in order); [] when none occurs. Of the occurrences, the latest with k
    tokens after it, else the earliest (a run of one repeated token drafts k, not the
    one before the end)."""
    if k < 1 or len(tokens) < 2:
        return []
    ids = np.asarray(tokens)
    tail = ids[-max_n:]
    best, corpus, starts = 0, ids, None
    for candidate in (ids, *elsewhere):
        n, after = _occurrences(candidate, tail)
        if n > best:
            best, corpus, starts = n, candidate, after
    if best < min_n:
        return []
    full = starts[starts + k <= len(corpus)]
    start = int(full[-1] if full.size else starts[0])
    return corpus[start:start + k].tolist()


def _occurrences(corpus: np.ndarray, tail: np.ndarray) -> tuple[int, np.ndarray]:
    """The longest n for which `tail`'s last n tokens occur in `corpus` with a token
    after them, and where those tokens after begin (in order). Found from the last
    token's occurrences, each extended backwards while it matches: one pass over the
    corpus, not one per n. An occurrence at corpus' very end (the tail itself, when the
    corpus is the sequence's own context) has nothing after it and does not count."""
    ends = np.flatnonzero(corpus[:-1] == tail[-1])
    if not ends.size:
        return 0, ends
    length = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for back in range(1, len(tail)):
        before = ends - back
        alive &= before >= 0
        alive[alive] = corpus[before[alive]] == tail[-1 - back]
        if not alive.any():
            break
        length += alive
    n = int(length.max())
    return n, ends[length == n] + 1


class History:
    """The recent outputs of each `history` key, as token arrays a sequence of that key
    drafts from: each begins with the last MAX_NGRAM tokens of its prompt (so a new
    answer's first tokens match how earlier ones began). Bounded: `per_key` outputs of at
    most `tokens` tokens for each of the `keys` keys used last."""

    def __init__(self, per_key: int = 8, tokens: int = 512, keys: int = 1024):
        self.per_key, self.tokens, self.keys = per_key, tokens, keys
        self.outputs: OrderedDict[Hashable, deque[np.ndarray]] = OrderedDict()

    def remember(self, key: Hashable, prompt: list[int], output: list[int]) -> None:
        if not output:
            return
        kept = self.outputs.setdefault(key, deque(maxlen=self.per_key))
        self.outputs.move_to_end(key)
        kept.appendleft(np.asarray(prompt[-MAX_NGRAM:] + output[:self.tokens],
                                   dtype=np.int32))
        while len(self.outputs) > self.keys:
            self.outputs.popitem(last=False)

    def of(self, key: Hashable | None) -> Iterable[np.ndarray]:
        """Key's outputs, latest first (none for None)."""
        return self.outputs.get(key, ()) if key is not None else ()


@torch.inference_mode()
def verify(logits: torch.Tensor, draft: list[int], params: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """The tokens a drafted sequence emits, from the target's logits [len(draft) + 1,
    vocab] after its last token and after each draft: the drafts the target keeps, then
    one token of its own (the correction of the first rejected draft, or the next token
    after all of them)."""
    if params.greedy:
        best = logits.argmax(dim=-1).tolist()
        for i, token in enumerate(draft):
            if best[i] != token:
                return best[:i + 1]
        return best
    kept = []
    for i, token in enumerate(draft):
        probs = distribution(logits[i], params)
        if torch.rand((), generator=generator, device=probs.device) < probs[token]:
            kept.append(token)
            continue
        probs[token] = 0  # what is left of p once d is not drawn (multinomial renormalizes)
        return kept + [int(torch.multinomial(probs, 1, generator=generator))]
    last = distribution(logits[len(draft)], params)
    return kept + [int(torch.multinomial(last, 1, generator=generator))]


def speculable(params: SamplingParams, virtual: bool) -> bool:
    """Whether a request may draft (the module docstring says why the others do not)."""
    return not (virtual or params.penalized or params.logprobs is not None)


@dataclass
class DraftState:
    """One sequence's record: tokens drafted and kept, and its back-off."""

    drafted: int = 0
    accepted: int = 0
    length: int = FIRST_LENGTH  # tokens to draft next, at most
    backoff: int = 0  # steps to wait between drafts now (0: every step)
    wait: int = 0  # steps left before the next draft


class Speculator:
    """Drafts for the decoding sequences of a step, and what became of them: the counts
    vLLM's spec-decode metrics report."""

    def __init__(self, tokens: int, max_batch: int = MAX_BATCH):
        self.tokens = tokens  # drafts per sequence and step, at most (0: off)
        self.max_batch = max_batch
        self.drafts = 0  # drafts made (one per sequence and step that drafted)
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.accepted_per_pos = [0] * tokens  # drafts kept at each position
        self.history = History()

    def draft(self, state: DraftState, tokens: Callable[[], list[int]], room: int,
              decoding: int, history: Hashable | None = None) -> list[int]:
        """A sequence's drafts this step: none when speculation is off, the batch is past
        max_batch decoding sequences, the sequence is backing off, or nothing in its
        context or its `history` key's outputs matches; at most its draft length and
        `room` (the tokens it may still emit, less one). `tokens()` gives its context,
        read only when it drafts."""
        if not self.tokens or decoding > self.max_batch or room < 1:
            return []
        if state.wait:
            state.wait -= 1
            return []
        return propose(tokens(), min(self.tokens, state.length, room),
                       elsewhere=self.history.of(history))

    def record(self, state: DraftState, drafted: int, accepted: int) -> None:
        """`accepted` of a sequence's `drafted` drafts were kept: count them, and back off
        a sequence whose drafts are mostly rejected (undone once they are kept again)."""
        self.drafts += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        for position in range(accepted):
            self.accepted_per_pos[position] += 1
        state.drafted += drafted
        state.accepted += accepted
        state.length = min(self.tokens, 2 * drafted) if accepted == drafted else \
            max(FIRST_LENGTH, accepted + 1)
        if state.drafted >= JUDGED_AFTER and state.accepted < LOW_ACCEPTANCE * state.drafted:
            state.backoff = min(MAX_BACKOFF, max(1, 2 * state.backoff))
            state.drafted = state.accepted = 0  # judged again on the next ones
        elif accepted == drafted:
            state.backoff = 0
        state.wait = state.backoff

    def families(self) -> list[CounterMetricFamily]:
        """The counts under vLLM's spec-decode names (vllm/v1/spec_decode/metrics.py):
        acceptance rate is accepted_tokens / draft_tokens, mean accepted length
        1 + accepted_tokens / drafts."""
        families = [CounterMetricFamily(name, help_text, value=value) for name, help_text, value
                    in (("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.",
                         self.drafts),
                        ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.",
                         self.draft_tokens),
                        ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                         self.accepted_tokens))]
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted tokens per draft position.",
                                      labels=["position"])
        for position, count in enumerate(self.accepted_per_pos):
            per_pos.add_metric([str(position)], count)
        return families + [per_pos]
