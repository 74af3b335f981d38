"""Retrieval-augmented chat prompts: passages go into the system message, as many as the
model's context leaves room for, the best one last, next to the question.

Best-last is measured, not taste: on the demo's 30 held-out questions (demo/, 3 passages
each, retrieval finding the right page for every one) the base SmolLM2-135M answered 50%
correctly with the best passage first and 67% with it last; small models lean on what
they read last."""

from collections.abc import Callable
from dataclasses import dataclass

from lorag.retrieval.store import Hit

INSTRUCTION = ("Answer the question using only the context below. Passages are numbered; "
               "each names its source.")


@dataclass
class Augmented:
    """The messages to template, the passages they carry, and how many did not fit."""

    messages: list[dict]
    used: list[Hit]
    dropped: int


def augment(messages: list[dict], hits: list[Hit],
            count_tokens: Callable[[list[dict]], int], budget: int) -> Augmented:
    """Put `hits` (best first) into the chat as context, dropping the lowest-ranked ones
    until the templated prompt is at most `budget` tokens. A caller's own system message
    stays first; the context follows it. With no room for even one passage, the messages
    come back unchanged and every hit counts as dropped."""
    for n in range(len(hits), 0, -1):
        candidate = with_context(messages, hits[:n])
        if count_tokens(candidate) <= budget:
            return Augmented(candidate, hits[:n], len(hits) - n)
    return Augmented(messages, [], len(hits))


def with_context(messages: list[dict], hits: list[Hit]) -> list[dict]:
    """`messages` with a system message holding the numbered passages; `hits` come best
    first and are written best last."""
    passages = "\n\n".join(f"[{i}] source: {hit.document_id}\n{hit.text}"
                           for i, hit in enumerate(reversed(hits), 1))
    context = f"{INSTRUCTION}\n\n{passages}"
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": f"{messages[0]['content']}\n\n{context}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]
