"""Retrieval namespaces behind tenants, by the rule in server/tenancy.py.

A caller reads its own namespaces and shared ones; it writes only its own, and only with
an admin key. Another tenant's private namespace is simply not found, with the same
message as a name nobody has.
"""

import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from lorag.errors import InvalidRequest, NotFound
from lorag.retrieval import SEARCH_MODE, TOP_K
from lorag.retrieval.ingest import Document
from lorag.retrieval.sandbox import Parser
from lorag.retrieval.store import DocumentStore, Hit
from lorag.server import tenancy
from lorag.server.limits import RequestLimits
from lorag.server.tenancy import Caller


class Namespaces:
    """Tenant-scoped documents and search over one DocumentStore."""

    def __init__(self, store: DocumentStore, limits: RequestLimits):
        self.store, self.limits = store, limits

    def put(self, caller: Caller, name: str, documents: list[dict]) -> list[dict]:
        """Add or replace documents ({id, text, metadata}) in one transaction; each
        one's outcome."""
        namespace = self._own(caller, name, "write documents")
        self.limits.check_documents(documents)
        outcomes = self.store.put_documents(namespace, [
            Document(d["id"], d["text"], d.get("metadata") or {}) for d in documents])
        return [{"id": d["id"], "status": status}
                for d, status in zip(documents, outcomes, strict=True)]

    def ingest_files(self, caller: Caller, name: str,
                     files: list[tuple[str, bytes]]) -> list[dict]:
        """Documents from uploaded files ((file name, bytes)), read by the loaders `lorag
        ingest` uses, in a process with a time and a memory limit (retrieval/sandbox.py);
        a file's document id is its name. Each file succeeds or fails on its own:
        {"file", "documents": [{id, status}]} or {"file", "error"}."""
        self._own(caller, name, "write documents")
        results = []
        with tempfile.TemporaryDirectory(prefix="lorag-upload-") as work, Parser() as parser:
            for index, (filename, data) in enumerate(files):
                # a browser sends a base name; anything else keeps only its last part
                base = PureWindowsPath(PurePosixPath(filename or "").name).name
                base = "unnamed" if base in ("", ".", "..") else base
                folder = Path(work) / str(index)
                folder.mkdir()
                (folder / base).write_bytes(data)
                try:
                    documents = [{"id": d.id, "text": d.text, "metadata": d.metadata}
                                 for d in parser.load(folder / base, base)]
                    results.append({"file": base,
                                    "documents": self.put(caller, name, documents)})
                except InvalidRequest as e:  # the loaders name the file by its path
                    results.append({"file": base,
                                    "error": e.message.replace(f"{folder}/", "")})
        return results

    def delete_document(self, caller: Caller, name: str, document_id: str) -> None:
        """Remove one document and its chunks; NotFound if there is no such document."""
        namespace = self._own(caller, name, "delete documents")
        if not self.store.delete(namespace, document_id):
            raise NotFound(f"namespace {name!r} has no document {document_id!r}", field="id")

    def search(self, caller: Caller, name: str, query: str, top_k: int = TOP_K,
               mode: str = SEARCH_MODE, filters: dict | None = None) -> list[Hit]:
        """The best chunks of one of the caller's namespaces, or a shared one."""
        return self.store.search(self.resolve(caller, name), query, top_k, filters, mode)

    def create(self, caller: Caller, name: str, shared: bool = False,
               reranker: str | None = None) -> bool:
        """Create one of the caller's namespaces, or set its settings: whether it is
        shared, and the adapter its RAG chats rerank with unless they say otherwise."""
        namespace = self._own(caller, name, "create namespaces")
        if shared:
            tenancy.check_shared_name(namespace, self.store.shared(), "namespace",
                                      "namespace")
        return self.store.create(namespace, shared, reranker)

    def reranker(self, caller: Caller, name: str) -> str | None:
        """The default reranker of one of the caller's namespaces, or a shared one."""
        return self.store.reranker(self.resolve(caller, name))

    def drop(self, caller: Caller, name: str) -> None:
        """Delete one of the caller's namespaces with everything in it."""
        if not self.store.drop_namespace(self._own(caller, name, "delete namespaces")):
            raise NotFound(f"namespace {name!r} does not exist", field="namespace")

    def list(self, caller: Caller) -> list[dict]:
        """The caller's namespaces and the shared ones, with document and chunk counts."""
        rows = []
        for row in self.store.overview():
            owner, name = tenancy.split(row["namespace"])
            if owner is not None and tenancy.visible(caller, row["namespace"], row["shared"]):
                rows.append({"name": name, "owner": owner, "shared": row["shared"],
                             "reranker": row["reranker"], "documents": row["documents"],
                             "chunks": row["chunks"]})
        return sorted(rows, key=lambda row: (row["owner"] != caller.tenant, row["name"]))

    def resolve(self, caller: Caller, name: str) -> str:
        """The stored namespace `name` means to this caller: its own, else a shared one."""
        found = tenancy.resolve(caller, name, self.store.exists, self.store.shared())
        if found is None:
            raise NotFound(f"namespace {name!r} does not exist; list yours at GET "
                           "/v1/namespaces", field="namespace")
        return found

    @staticmethod
    def _own(caller: Caller, name: str, action: str) -> str:
        return tenancy.own_key(caller, name, action=action, what="namespace", field="namespace")
