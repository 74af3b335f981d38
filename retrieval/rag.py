"""Retrieval-augmented chat prompts: passages go into the system message, as many as the
model's context leaves room for, the best one last, next to the question.

Best-last is measured, not taste: on the demo's 30 held-out questions (demo/, 3 passages
each, retrieval finding the right page for every one) the base SmolLM2-135M answered 50%
correctly with the best passage first and 67% with it last; small models lean on what
they read last. The others stand before it by document and chunk, not by rank, so that
two phrasings of a question that retrieve the same passages share the prompt's prefix in
the KV cache. The base's answers did not suffer (base + RAG on the same questions: 70% ->
73% with 3 passages, 57% -> 67% with 4). An adapter does best in the layout it was
trained on: the demo's, trained and asked in rank order, answered 77%; in this layout,
70%; crossed either way, 67% (README, "make demo"; one training run each)."""

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from lorag.retrieval.store import Hit

INSTRUCTION = ("Answer the question using only the context below. Passages are numbered; "
               "each names its source.")
# the layout `with_context` writes; an adapter trained on it (trainer/raft.py) records it,
# so a change here is a new version
RAG_LAYOUT = "best-last/1"

# How a grounded answer declines when its passages do not hold the answer: what a RAFT
# adapter learns to say (trainer/raft.py; JSON answers cite NO_SOURCE), and the phrases,
# normalised as SQuAD normalises answers (lower case, no punctuation or articles), by which
# `lorag eval generate`'s abstain metric and the playground (through /v1/server) recognise
# a declined answer from any model.
ABSTAIN = "The sources do not say."
NO_SOURCE = "none"
ABSTENTIONS = ("sources do not say", "not in sources", "sources do not", "do not know",
               "dont know", "no information", "cannot find", "can not find",
               "not mentioned", "not stated", "cannot answer", "unable to answer")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation or English articles,
    whitespace collapsed (the evaluation's text metrics use it too)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def declines(answer: str, abstain: str | None = None) -> bool:
    """Whether a grounded answer declines: a JSON object citing NO_SOURCE, or a text
    whose normalised words hold one of ABSTENTIONS or `abstain` (the abstention an
    adapter was trained with, when it is another)."""
    try:
        value = json.loads(answer)
    except ValueError:
        value = None
    if isinstance(value, dict) and value.get("source") == NO_SOURCE:
        return True
    text = f" {normalize(answer)} "
    phrases = [*ABSTENTIONS, *([normalize(abstain)] if abstain else [])]
    return any(f" {phrase} " in text for phrase in phrases if phrase)


@dataclass
class Augmented:
    """The rendered prompt, the passages it carries, and how many did not fit."""

    prompt_ids: list[int]
    used: list[Hit]
    dropped: int


def augment(messages: list[dict], hits: list[Hit], render: Callable[[list[dict]], list[int]],
            count_tokens: Callable[[str], int], budget: int) -> Augmented:
    """Put `hits` (best first) into the chat as context and render it (`render`: the chat
    template, to token ids), dropping the lowest-ranked passages until the prompt is at
    most `budget` tokens. Renders once when everything fits (the usual case); otherwise
    drops as many passages as their own token counts say are too many and renders again.
    A caller's own system message stays first; the context follows it. With no room for
    even one passage, the chat is rendered without context and every hit is dropped."""
    used = len(hits)
    prompt = render(with_context(messages, hits))
    while len(prompt) > budget and used > 0:
        excess = len(prompt) - budget
        while used > 0 and excess > 0:
            used -= 1
            excess -= count_tokens(_passage(used + 1, hits[used]))
        prompt = render(with_context(messages, hits[:used]) if used else messages)
    return Augmented(prompt, hits[:used], len(hits) - used)


def with_context(messages: list[dict], hits: list[Hit]) -> list[dict]:
    """`messages` with a system message holding the numbered passages; `hits` come best
    first and are written best last, the others before it in a fixed order (document,
    chunk) rather than by rank, so that two questions retrieving the same passages share
    the prompt up to the best one, whatever their ranks (the KV cache's prefix)."""
    ordered = sorted(hits[1:], key=lambda hit: (hit.document_id, hit.chunk_id)) + hits[:1]
    passages = "\n\n".join(_passage(i, hit) for i, hit in enumerate(ordered, 1))
    context = f"{INSTRUCTION}\n\n{passages}"
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": f"{messages[0]['content']}\n\n{context}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]


_PLAIN_STRING = {"type", "description", "title", "minLength", "maxLength"}


def citing(schema: dict, field: str, sources: list[str]) -> dict:
    """`schema` (a JSON schema of an object) with its top-level string property `field`
    allowed only the names of `sources` (the passages a grounded prompt carries) and
    NO_SOURCE, so that a constrained answer cites a passage it was given, or none. Raises
    ValueError saying what in `schema` does not allow it."""
    properties = schema.get("properties")
    if schema.get("type") not in ("object", None) or not isinstance(properties, dict) \
            or field not in properties:
        raise ValueError(f"the response_format's json_schema has no top-level property "
                         f"{field!r} to cite with")
    prop = properties[field]
    if not isinstance(prop, dict) or prop.get("type", "string") != "string" \
            or prop.keys() - _PLAIN_STRING:
        raise ValueError(f"property {field!r} of the json_schema must be a plain string "
                         f"(keys {', '.join(sorted(_PLAIN_STRING))} at most) to be limited "
                         "to the sources")
    cited = {key: value for key, value in prop.items() if key in ("description", "title")}
    cited |= {"type": "string", "enum": list(dict.fromkeys([*sources, NO_SOURCE]))}
    return {**schema, "properties": {**properties, field: cited}}


def _passage(number: int, hit: Hit) -> str:
    return f"[{number}] source: {hit.document_id}\n{hit.text}"
