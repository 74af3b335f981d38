"""Sampling parameters and the sampler: penalties, greedy, temperature, top-k, top-p, seeded,
and the log-probabilities a request asks for."""

import reprlib
from dataclasses import dataclass, field

import torch

from lorag.errors import InvalidRequest
from lorag.server.engine.stream import TokenLogprob
from lorag.server.engine.structured import Constraint

MAX_LOGPROBS = 20  # most likely tokens a request may ask to see per position (OpenAI's)
# A temperature below this samples greedily (vLLM's `_SAMPLING_EPS`): dividing logits by a
# tiny temperature overflows them to inf, and softmax of inf is NaN.
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, per request (OpenAI's names and meanings).

    temperature 0 (or anything below SAMPLING_EPS) is greedy. top_k 0 and top_p 1 switch
    those filters off. seed makes sampling reproducible per request. stop strings end the
    output (not included in it); ignore_eos keeps generating past end-of-sequence (for
    benchmarks).
    presence_penalty and frequency_penalty (-2..2, OpenAI's) lower a token's logit by a
    flat amount once it appeared in the output, and per appearance; repetition_penalty
    (vLLM's and HF's meaning, 1 is off) divides a positive logit, multiplies a negative one,
    of every token in the prompt or the output. 0, 0 and 1 leave the logits untouched.
    logprobs: None for none; n for the sampled token's log-probability and the n most
    likely tokens' (0-20) at each position. constraint: what the output must match.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    constraint: Constraint | None = None

    def __post_init__(self):
        number = (int, float)
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             "an integer >= 1"),
            ("temperature", isinstance(self.temperature, number)
             and 0 <= self.temperature <= 2, "a number in [0, 2]"),
            ("top_p", isinstance(self.top_p, number) and 0 < self.top_p <= 1,
             "a number in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            # how many and how long: the service's limits (server/limits.py)
            ("stop", isinstance(self.stop, list)
             and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("presence_penalty", isinstance(self.presence_penalty, number)
             and -2 <= self.presence_penalty <= 2, "a number in [-2, 2]"),
            ("frequency_penalty", isinstance(self.frequency_penalty, number)
             and -2 <= self.frequency_penalty <= 2, "a number in [-2, 2]"),
            ("repetition_penalty", isinstance(self.repetition_penalty, number)
             and 0 < self.repetition_penalty <= 2, "a number in (0, 2]"),
            ("logprobs", self.logprobs is None or isinstance(self.logprobs, int)
             and 0 <= self.logprobs <= MAX_LOGPROBS, f"an integer in 0..{MAX_LOGPROBS}"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                got = reprlib.repr(getattr(self, name))  # a huge value is not echoed whole
                raise InvalidRequest(f"{name} must be {allowed}, got {got}", field=name)

    @property
    def greedy(self) -> bool:
        """Whether this request picks the most likely token every time."""
        return self.temperature < SAMPLING_EPS

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1)


def penalize(logits: torch.Tensor, params: list[SamplingParams],
             histories: list[tuple[list[int], list[int]]]) -> None:
    """Apply each row's penalties to `logits` [rows, vocab] in place; histories are the
    rows' (prompt ids, output ids). Rows without penalties are not touched."""
    for row, (p, (prompt, output)) in enumerate(zip(params, histories, strict=True)):
        if not p.penalized:
            continue
        scores = logits[row]
        if p.repetition_penalty != 1:
            seen = torch.tensor(prompt + output, device=logits.device).unique()
            values = scores[seen]
            scores[seen] = torch.where(values > 0, values / p.repetition_penalty,
                                       values * p.repetition_penalty)
        if output and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(output, device=logits.device).unique(return_counts=True)
            scores[ids] -= p.frequency_penalty * counts + p.presence_penalty


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """Pick one token per row of `logits` [rows, vocab] (float32)."""
    tokens = logits.argmax(dim=-1).tolist()  # greedy for everyone, overwritten below
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            tokens[row] = int(torch.multinomial(distribution(logits[row], p), 1,
                                                generator=generator))
    return tokens


def distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What a sampled (not greedy) request draws its next token from, given one row of
    logits [vocab]: temperature, then top-k, then top-p."""
    scores = logits / p.temperature
    if p.top_k:
        kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # drop tokens whose preceding mass already exceeds top_p (the first always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > p.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    return torch.softmax(scores, dim=-1)


class Logprobs:
    """The log-softmax of the rows that asked for logprobs, taken when constructed (the
    engine does so after the grammar mask, before penalties and temperature: vLLM's
    default, `raw_logprobs`), read once the tokens are sampled."""

    def __init__(self, logits: torch.Tensor, params: list[SamplingParams]):
        self.wanted = {row: p.logprobs for row, p in enumerate(params) if p.logprobs is not None}
        rows = list(self.wanted)
        self.values = torch.log_softmax(logits[rows], dim=-1) if rows else None
        self.index = {row: i for i, row in enumerate(rows)}

    def of(self, row: int, token: int) -> TokenLogprob | None:
        """Row `row`'s entry for the token it sampled; None if it asked for none."""
        if row not in self.wanted:
            return None
        values = self.values[self.index[row]]
        top = []
        if self.wanted[row]:
            best = torch.topk(values, self.wanted[row])
            top = [(int(i), float(v)) for v, i in zip(best.values, best.indices, strict=True)
                   if torch.isfinite(v)]
        return TokenLogprob(token, float(values[token]), top)
