"""Split a document into overlapping chunks measured in the embedder's tokens.

Markdown-style headings (`#`, `##`, ...) start sections; a chunk never spans two sections
and carries its section's heading path in metadata (`section`), so a passage keeps the
context a reader would see. Windows of `size` tokens step by `size - overlap`; the chunk
text is the exact slice of the source those tokens cover (via offset mapping), not a
detokenised approximation.
"""

import re
from dataclasses import dataclass, field

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


@dataclass
class Chunk:
    """One passage: its text, its position in the document, and its metadata."""

    text: str
    position: int
    metadata: dict = field(default_factory=dict)


def chunk_text(text: str, tokenizer, size: int = 200, overlap: int = 40) -> list[Chunk]:
    """Chunks of at most `size` tokens, consecutive ones sharing `overlap` tokens."""
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size), got overlap={overlap} size={size}")
    chunks: list[Chunk] = []
    for title, body in _sections(text):
        # the whole section at once (verbose=False: being longer than the model's window
        # is the point here, the windows below are what gets embedded)
        offsets = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True,
                            verbose=False)["offset_mapping"]
        if not offsets:
            continue
        for start in range(0, max(1, len(offsets) - overlap), size - overlap):
            window = offsets[start:start + size]
            piece = body[window[0][0]:window[-1][1]].strip()
            if piece:
                metadata = {"section": title} if title else {}
                chunks.append(Chunk(piece, len(chunks), metadata))
    return chunks


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading path, body) pairs; text before the first heading has an empty path."""
    sections, path, last = [], [], 0
    for match in _HEADING.finditer(text):
        sections.append((" > ".join(title for _, title in path), text[last:match.start()]))
        level = len(match[1])
        path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, match[2])]
        last = match.end()
    sections.append((" > ".join(title for _, title in path), text[last:]))
    return [(title, body) for title, body in sections if body.strip()]
