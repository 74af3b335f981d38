"""One tenant's namespaces, wherever they live: in a data dir (`Local`) or behind a running
daemon (`Remote`, over its HTTP API). The CLI's ingest, search, namespaces and eval
commands take either, so each works with `--data-dir` and with `--url` alike.

A data dir stores tenant T's namespace N as "T.N" (`retrieval.store.scoped`), the way the
daemon does, so documents ingested for tenant "default" (the CLI's default) are what a
daemon started without API keys serves.
"""

from dataclasses import asdict
from pathlib import Path

import httpx
from lorag.retrieval.ingest import Document
from lorag.retrieval.store import DocumentStore, scoped

from lorag.daemon_errors import daemon_error
from lorag.errors import NotFound

BATCH = 1000  # documents per request, the daemon's limit


class Local:
    """Namespaces of `tenant` in the document store under `data_dir/retrieval`."""

    def __init__(self, data_dir: Path, tenant: str = "default"):
        from lorag.retrieval.embedder import Embedder  # loads sentence-transformers

        self.store = DocumentStore(Path(data_dir) / "retrieval", Embedder())
        self.tenant = tenant

    def put(self, namespace: str, documents: list[Document]) -> list[str]:
        """Add or replace documents; "added", "updated" or "unchanged" for each."""
        return self.store.put(scoped(self.tenant, namespace), documents)

    def search(self, namespace: str, query: str, k: int = 5, mode: str = "hybrid",
               filters: dict | None = None) -> list[dict]:
        """Hits as dicts (document_id, chunk_id, score, text, metadata)."""
        stored = scoped(self.tenant, namespace)
        if not self.store.exists(stored):
            raise NotFound(f"namespace {namespace!r} does not exist", field="namespace")
        return [asdict(h) for h in self.store.search(stored, query, k, filters, mode)]

    def list(self) -> list[dict]:
        """Every namespace in the data dir (all tenants: this is the operator's view)."""
        return [{"name": row["name"], "owner": row["owner"] or "", "shared": row["shared"],
                 "documents": row["documents"], "chunks": row["chunks"]}
                for row in self.store.overview()]

    def drop(self, namespace: str) -> None:
        """Delete a namespace and everything in it."""
        if not self.store.drop_namespace(scoped(self.tenant, namespace)):
            raise NotFound(f"namespace {namespace!r} does not exist", field="namespace")


class Remote:
    """The namespaces an API key sees on a running daemon."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def put(self, namespace: str, documents: list[Document]) -> list[str]:
        statuses = []
        for start in range(0, len(documents), BATCH):
            body = {"documents": [asdict(d) for d in documents[start:start + BATCH]]}
            answer = self._call("POST", f"/v1/namespaces/{namespace}/documents", body)
            statuses += [d["status"] for d in answer["documents"]]
        return statuses

    def search(self, namespace: str, query: str, k: int = 5, mode: str = "hybrid",
               filters: dict | None = None) -> list[dict]:
        body = {"query": query, "top_k": k, "mode": mode, "filter": filters}
        return self._call("POST", f"/v1/namespaces/{namespace}/search", body)["data"]

    def list(self) -> list[dict]:
        return self._call("GET", "/v1/namespaces")["data"]

    def drop(self, namespace: str) -> None:
        self._call("DELETE", f"/v1/namespaces/{namespace}")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise RuntimeError(f"cannot reach the daemon at {self.url}: {e}") from e
        if response.status_code != 200:
            raise daemon_error(response, f"the daemon at {self.url} says")
        return response.json()


def open_namespaces(url: str | None, api_key: str | None, data_dir: Path,
                    tenant: str) -> "Local | Remote":
    """`Remote` when a daemon URL is given, else `Local` on the data dir."""
    return Remote(url, api_key) if url else Local(data_dir, tenant)

