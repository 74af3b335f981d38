"""A client of a running lorag daemon over its HTTP API: the one every `--url` command,
`lorag eval generate`, `lorag train --serve` and `lorag adapters` use.

The daemon's refusals come back as lorag's own errors (4xx: the caller's mistake, with
the daemon's message and field) or a RuntimeError (the daemon is unreachable or failed),
so the CLI reports them exactly as it reports a local mistake. Its namespace methods
(`put_documents`, `search`, `namespaces`, `drop_namespace`) have the same shape as the
data dir's in the CLI, so commands work on either. `sse_data` and `sse_event` read the
lines of a streamed answer, for every reader of one (the tests and benchmarks too).
"""

import json
from dataclasses import asdict

import httpx

from lorag.errors import InvalidRequest, LoragError, NotFound, PermissionDenied, Unauthenticated

DOCUMENT_BATCH = 1000  # documents per request, the daemon's limit
DONE = "[DONE]"  # the data of an OpenAI stream's last event
_ERRORS: dict[int, type[LoragError]] = {401: Unauthenticated, 403: PermissionDenied,
                                        404: NotFound}


def sse_data(line: str) -> str | None:
    """The data of one line of a server-sent event stream; None for any other line."""
    return line[len("data: "):] if line.startswith("data: ") else None


def sse_event(line: str) -> dict | None:
    """One line of an OpenAI stream as its JSON event; None for other lines and the
    closing `data: [DONE]`."""
    data = sse_data(line)
    return None if data is None or data == DONE else json.loads(data)


class DaemonClient:
    """One daemon at `url`, as the holder of `api_key` (None for an open daemon)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    # ---- generation ----

    def chat(self, body: dict) -> dict:
        """POST /v1/chat/completions with an OpenAI-shaped body (plus lorag's `rag`)."""
        return self._call("POST", "/v1/chat/completions", body)

    # ---- adapters ----

    def adapters(self) -> list[dict]:
        """The adapters this key sees, with their status."""
        return self._call("GET", "/v1/adapters")["data"]

    def load_adapter(self, name: str, path: str, shared: bool = False) -> dict:
        """Register an adapter folder (a path the daemon can read) under `name`."""
        return self._call("POST", "/v1/adapters", {"name": name, "path": path,
                                                    "shared": shared})

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; running requests finish."""
        self._call("DELETE", f"/v1/adapters/{name}")

    def pin_adapter(self, name: str, pinned: bool = True) -> dict:
        """Keep an adapter in a compute slot (or let it go again); its status after."""
        return self._call("POST", f"/v1/adapters/{name}/{'pin' if pinned else 'unpin'}")

    def rollout(self, name: str, versions: dict[str, int]) -> dict:
        """Serve `name` by weighted versions (`name@version` adapters)."""
        return self._call("POST", f"/v1/adapters/{name}/rollout", {"versions": versions})

    # ---- namespaces ----

    def put_documents(self, namespace: str, documents: list) -> list[str]:
        """Add or replace documents (dataclasses with id, text, metadata), in batches;
        "added", "updated" or "unchanged" for each."""
        statuses = []
        for start in range(0, len(documents), DOCUMENT_BATCH):
            batch = [asdict(d) for d in documents[start:start + DOCUMENT_BATCH]]
            answer = self._call("POST", f"/v1/namespaces/{namespace}/documents",
                                {"documents": batch})
            statuses += [d["status"] for d in answer["documents"]]
        return statuses

    def search(self, namespace: str, query: str, k: int | None = None,
               mode: str | None = None, filters: dict | None = None) -> list[dict]:
        """Hits as dicts (document_id, chunk_id, score, text, metadata); what is left
        out takes the daemon's defaults."""
        given = {"top_k": k, "mode": mode, "filter": filters}
        body = {"query": query, **{name: v for name, v in given.items() if v is not None}}
        return self._call("POST", f"/v1/namespaces/{namespace}/search", body)["data"]

    def rerank(self, model: str, query: str, documents: list[str]) -> list[dict]:
        """POST /v1/rerank: {index, relevance_score} per document, most relevant first."""
        return self._call("POST", "/v1/rerank", {"model": model, "query": query,
                                                 "documents": documents,
                                                 "return_documents": False})["results"]

    def namespaces(self) -> list[dict]:
        """The namespaces this key sees, with owner, shared flag and counts."""
        return self._call("GET", "/v1/namespaces")["data"]

    def drop_namespace(self, namespace: str) -> None:
        """Delete one of this key's tenant's namespaces with everything in it."""
        self._call("DELETE", f"/v1/namespaces/{namespace}")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise RuntimeError(f"cannot reach the daemon at {self.url}: {e}") from e
        if response.status_code != 200:
            raise daemon_error(response, f"the daemon at {self.url} says")
        return response.json()


def daemon_error(response: httpx.Response, what: str) -> Exception:
    """The error a failed `response` means: the caller's mistake (4xx) as the matching
    LoragError with the daemon's message and field, anything else as a RuntimeError."""
    try:
        error = response.json()["error"]
        message, field = error["message"], error.get("param")
    except (ValueError, KeyError, TypeError):
        message, field = response.text, None
    text = f"{what} ({response.status_code}): {message}"
    if not 400 <= response.status_code < 500:
        return RuntimeError(text)
    return _ERRORS.get(response.status_code, InvalidRequest)(text, field=field)
