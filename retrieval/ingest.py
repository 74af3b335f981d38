"""Files -> documents -> the store, with per-file outcomes.

Loaders are an ordered list of (suffixes, function), first match wins. A document's id is
its path relative to the PATH argument it was found under; a lone file's id is its name;
a .jsonl file holds one document per line with its own `id`.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bs4 import BeautifulSoup
from pypdf import PdfReader
from pypdf.errors import PdfReadError

from lorag.errors import InvalidRequest
from lorag.jsonl import read_objects
from lorag.names import check_name


@dataclass
class Document:
    """Text to index, under an id, with metadata filters can use."""

    id: str
    text: str
    metadata: dict = field(default_factory=dict)


def _plain(path: Path, doc_id: str) -> list[Document]:
    return [Document(doc_id, path.read_text(encoding="utf-8"),
                     {"source": doc_id, "format": path.suffix.lstrip(".")})]


def _jsonl(path: Path, doc_id: str) -> list[Document]:
    documents = []
    for where, record in read_objects(path, "path"):
        if not isinstance(record.get("id"), str) or not isinstance(record.get("text"), str):
            raise InvalidRequest(f"{where}: needs string 'id' and 'text'")
        metadata = record.get("metadata", {})
        if not isinstance(metadata, dict):
            raise InvalidRequest(f"{where}: 'metadata' must be an object")
        documents.append(Document(record["id"], record["text"],
                                  {"source": doc_id, "format": "jsonl", **metadata}))
    return documents


def _html(path: Path, doc_id: str) -> list[Document]:
    # headings become Markdown headings, so chunks keep their section path
    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    for tag in soup(["script", "style", "noscript"]):
        tag.decompose()
    for level in range(1, 7):
        for heading in soup.find_all(f"h{level}"):
            heading.replace_with(f"\n{'#' * level} {heading.get_text(' ', strip=True)}\n")
    text = "\n".join(line.strip() for line in soup.get_text().splitlines() if line.strip())
    title = soup.title.get_text(strip=True) if soup.title else ""
    metadata = {"source": doc_id, "format": "html", **({"title": title} if title else {})}
    return [Document(doc_id, text, metadata)]


def _pdf(path: Path, doc_id: str) -> list[Document]:
    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except PdfReadError as e:
        raise InvalidRequest(f"{path} is not a readable PDF: {e}") from e
    text = "\n\n".join(pages).strip()
    if not text:
        raise InvalidRequest(f"{path} has no extractable text (a scan? OCR it first)")
    return [Document(doc_id, text, {"source": doc_id, "format": "pdf", "pages": len(pages)})]


LOADERS: list[tuple[tuple[str, ...], Callable[[Path, str], list[Document]]]] = [
    ((".txt", ".md", ".markdown"), _plain),
    ((".jsonl",), _jsonl),
    ((".html", ".htm"), _html),
    ((".pdf",), _pdf),
]
SUFFIXES = {suffix for suffixes, _ in LOADERS for suffix in suffixes}


def files_under(paths: list[Path]) -> Iterator[tuple[Path, str]]:
    """(file, document id) for every supported file under the given paths."""
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise InvalidRequest(f"{root} does not exist", field="paths")
        if root.is_file():
            yield root, root.name
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if path.suffix.lower() in SUFFIXES:
                yield path, path.relative_to(root).as_posix()


def load(path: Path, doc_id: str) -> list[Document]:
    """The documents in one file; InvalidRequest says why a file cannot be read."""
    for suffixes, loader in LOADERS:
        if path.suffix.lower() in suffixes:
            try:
                return loader(path, doc_id)
            except UnicodeDecodeError as e:
                raise InvalidRequest(f"{path} is not UTF-8 text ({e.reason})") from e
    raise InvalidRequest(f"{path}: unsupported file type {path.suffix!r}; supported: "
                         f"{', '.join(sorted(SUFFIXES))}")


def ingest(target, namespace: str, paths: list[Path],
           on_file: Callable[[Path, str], None] | None = None) -> dict:
    """Ingest every supported file into `target` (a tenant's namespaces on a data dir or a
    daemon: anything with `put_documents(namespace, documents) -> outcomes`), one file at
    a time; returns counts and the failures with their reasons."""
    check_name(namespace, "namespace", "namespace")
    counts = {"added": 0, "updated": 0, "unchanged": 0, "failed": []}
    for path, doc_id in files_under(paths):
        try:
            for outcome in target.put_documents(namespace, load(path, doc_id)):
                counts[outcome] += 1
            outcome = "ok"
        except InvalidRequest as e:
            counts["failed"].append({"file": str(path), "reason": e.message})
            outcome = "failed"
        if on_file:
            on_file(path, outcome)
    return counts
