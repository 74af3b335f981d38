"""Real documentation to measure retrieval on: the Python Language Reference's topics, as
every CPython installation ships them (`pydoc_data.topics`, the text `help("if")` shows),
so a test or a benchmark has them without a download.

Each topic is cut into its sections at their underlined headings (`====`, `----`, `****`):
one document per section, its id the heading's slug. The topics repeat sections (topic
"if" is also a section of "compound statements"): a section whose heading was seen and
whose text is nearly the same (difflib's quick ratio over 0.9) is left out, as a
documentation site holds each page once; a heading seen with other text gets its topic in
its id, and a slug taken already a number. The questions labelled against it are in
benchmarks/data/pyref-questions.jsonl.
"""

import difflib
import json
import re
import shutil
from pathlib import Path

from lorag.retrieval.ingest import Document

RULE = re.compile(r"^([*=\-~^])\1{2,}$")  # a heading's underline
SAME_TEXT = 0.9
HELD_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "pyref-questions.jsonl"


def python_reference() -> list[Document]:
    """The Python Language Reference's sections, each a document with its heading first;
    metadata: the topic, the heading."""
    from pydoc_data.topics import topics

    kept: dict[str, str] = {}  # id -> text
    by_heading: dict[str, str] = {}  # heading -> the first text kept under it
    documents = []
    for topic, text in topics.items():
        for heading, body in _sections(topic, text):
            first = by_heading.get(heading)
            if first is not None and difflib.SequenceMatcher(
                    None, first[:3000], body[:3000]).quick_ratio() > SAME_TEXT:
                continue
            doc_id = _slug(heading) if first is None else f"{_slug(heading)}--{topic}"
            doc_id = next(f"{doc_id}-{n}" if n else doc_id for n in range(len(kept) + 1)
                          if (f"{doc_id}-{n}" if n else doc_id) not in kept)
            by_heading.setdefault(heading, body)
            kept[doc_id] = body
            documents.append(Document(doc_id, body, {"topic": topic, "heading": heading}))
    return documents


def _sections(topic: str, text: str) -> list[tuple[str, str]]:
    """(heading, text from the heading on) of each section of a topic; text before the
    first heading is its own section, headed by the topic's name."""
    lines = text.splitlines()
    starts = [i - 1 for i in range(1, len(lines))
              if RULE.match(lines[i].strip()) and lines[i - 1].strip()]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    sections = []
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        headed = start + 1 < len(lines) and RULE.match(lines[start + 1].strip())
        body = "\n".join(lines[start:end]).strip()
        if body:
            sections.append((lines[start].strip() if headed else topic, body))
    return sections


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", heading.lower()).strip("-")


def heading_questions(documents: list[Document]) -> list[dict]:
    """One made-up question per section, from its heading alone ("What does the Python
    reference say about Lambdas?", answer the heading, source the section): training data
    for a namespace's relevance adapter that uses no held-out question, only the corpus."""
    return [{"question": f"What does the Python reference say about "
                        f"{d.metadata['heading']}?",
             "answer": d.metadata["heading"], "source": d.id} for d in documents]


def write_python_reference(folder: Path) -> dict[str, Path]:
    """The corpus as a file `lorag ingest` reads (documents.jsonl), the heading questions
    to train a relevance adapter on (train-questions.jsonl) and the held-out questions
    (questions.jsonl), under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    documents = python_reference()
    paths = {"documents": folder / "documents.jsonl",
             "train": folder / "train-questions.jsonl", "questions": folder / "questions.jsonl"}
    rows = {"documents": [{"id": d.id, "text": d.text, "metadata": d.metadata}
                          for d in documents],
            "train": heading_questions(documents)}
    for name, items in rows.items():
        paths[name].write_text("".join(json.dumps(row, ensure_ascii=False) + "\n"
                                       for row in items), encoding="utf-8")
    shutil.copyfile(HELD_OUT, paths["questions"])
    return paths
