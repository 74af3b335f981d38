"""Retrieval namespaces behind tenants: the same ownership rules as adapters.

Tenant T's namespace N is the document store's "T.N" (`retrieval.store.scoped`). A caller
reads its own namespaces and the ones other tenants marked shared (shared names are
unique); it writes only its own, and only with an admin key. Another tenant's private
namespace is simply not found, with the same message as a name nobody has.
"""

from lorag.retrieval.store import DocumentStore, Hit, scoped, unscoped
from lorag.server.auth import Caller

from lorag.errors import InvalidRequest, NotFound, PermissionDenied

MAX_BATCH = 1000  # documents in one request


class Namespaces:
    """Tenant-scoped documents and search over one DocumentStore."""

    def __init__(self, store: DocumentStore):
        self.store = store

    def put(self, caller: Caller, name: str, documents: list[dict]) -> list[dict]:
        """Add or replace documents ({id, text, metadata}); each one's outcome."""
        namespace = self._own(caller, name, "write documents")
        return [{"id": d["id"], "status": self.store.upsert(namespace, d["id"], d["text"],
                                                            d.get("metadata"))}
                for d in documents]

    def delete_document(self, caller: Caller, name: str, document_id: str) -> None:
        """Remove one document and its chunks; NotFound if there is no such document."""
        namespace = self._own(caller, name, "delete documents")
        if not self.store.delete(namespace, document_id):
            raise NotFound(f"namespace {name!r} has no document {document_id!r}", field="id")

    def search(self, caller: Caller, name: str, query: str, top_k: int = 5,
               mode: str = "hybrid", filters: dict | None = None) -> list[Hit]:
        """The best chunks of one of the caller's namespaces, or a shared one."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequest("query is empty", field="query")
        return self.store.search(self.resolve(caller, name), query, top_k, filters, mode)

    def create(self, caller: Caller, name: str, shared: bool = False) -> bool:
        """Create one of the caller's namespaces, or change whether it is shared."""
        namespace = self._own(caller, name, "create namespaces")
        if shared:
            for other in self.store.shared():
                if unscoped(other)[1] == name and other != namespace:
                    raise InvalidRequest(f"a shared namespace named {name!r} already exists "
                                         f"(tenant {unscoped(other)[0]!r}); choose another "
                                         "name", field="namespace")
        return self.store.create(namespace, shared)

    def drop(self, caller: Caller, name: str) -> None:
        """Delete one of the caller's namespaces with everything in it."""
        if not self.store.drop_namespace(self._own(caller, name, "delete namespaces")):
            raise NotFound(f"namespace {name!r} does not exist", field="namespace")

    def list(self, caller: Caller) -> list[dict]:
        """The caller's namespaces and the shared ones, with document and chunk counts."""
        rows = [{key: row[key] for key in ("name", "owner", "shared", "documents", "chunks")}
                for row in self.store.overview()
                if row["owner"] is not None and (row["owner"] == caller.tenant or row["shared"])]
        return sorted(rows, key=lambda row: (row["owner"] != caller.tenant, row["name"]))

    def resolve(self, caller: Caller, name: str) -> str:
        """The stored namespace `name` means to this caller: its own, else a shared one."""
        own = scoped(caller.tenant, name)
        if self.store.exists(own):
            return own
        for namespace in self.store.shared():
            if unscoped(namespace)[1] == name:
                return namespace
        raise NotFound(f"namespace {name!r} does not exist; list yours at GET /v1/namespaces",
                       field="namespace")

    @staticmethod
    def _own(caller: Caller, name: str, what: str) -> str:
        if not caller.admin:
            raise PermissionDenied(f"this API key may not {what}; use an admin key",
                                   field="authorization")
        return scoped(caller.tenant, name)
