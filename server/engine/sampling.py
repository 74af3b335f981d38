"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded."""

from dataclasses import dataclass, field

import torch

from lorag.errors import InvalidRequest


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, per request (OpenAI's names and meanings).

    temperature 0 is greedy. top_k 0 and top_p 1 switch those filters off. seed makes
    sampling reproducible per request. stop strings end the output (not included in it);
    ignore_eos keeps generating past end-of-sequence (for benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             "an integer >= 1"),
            ("temperature", isinstance(self.temperature, (int, float))
             and 0 <= self.temperature <= 2, "a number in [0, 2]"),
            ("top_p", isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
             "a number in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("stop", isinstance(self.stop, list) and len(self.stop) <= 16
             and all(isinstance(s, str) and s for s in self.stop),
             "a list of at most 16 non-empty strings"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise InvalidRequest(f"{name} must be {allowed}, got {getattr(self, name)!r}",
                                     field=name)

    @property
    def greedy(self) -> bool:
        """Whether this request picks the most likely token every time."""
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """Pick one token per row of `logits` [rows, vocab] (float32)."""
    tokens = logits.argmax(dim=-1).tolist()  # greedy for everyone, overwritten below
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        scores = logits[row] / p.temperature
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True)
            sorted_probs = torch.softmax(sorted_scores, dim=-1)
            # drop tokens whose preceding mass already exceeds top_p (the first always stays)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs > p.top_p
            scores = scores.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generator))
    return tokens
