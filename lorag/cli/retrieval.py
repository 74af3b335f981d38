"""`lorag ingest`, `lorag search`, `lorag namespaces`: retrieval on the state or a daemon.

Each command works on the state database directly (`--state`, default the data dir's
SQLite file; a fleet's PostgreSQL, so a batch ingest can run as a job beside the
replicas; as tenant `--tenant`) or, with `--url`, on a running daemon as the holder of
`--api-key`: both are namespaces with one face (`put_documents`, `search`, `namespaces`,
`drop_namespace`).
"""

import atexit
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorag.cli.common import (
    ApiKey,
    DataDir,
    State,
    Tenant,
    Url,
    console,
    data_dir_or_default,
    given_only,
    group,
)
from lorag.client import DaemonClient
from lorag.errors import InvalidRequest, NotFound
from lorag.names import check_name
from lorag.retrieval import MAX_TOP_K, SEARCH_MODE, TOP_K
from lorag.server import tenancy

namespaces_app = group("Retrieval namespaces, in the data dir or on a daemon.")


class StoreNamespaces:
    """One tenant's namespaces in the state database's document store, keyed as the
    daemon keys them (server/tenancy.py): what is ingested here for tenant "default" is
    what a daemon started without API keys on the same state serves."""

    def __init__(self, state: str, cache_dir: Path, tenant: str = "default",
                 chunk_tokens: int = 200, chunk_overlap: int = 40):
        from lorag.retrieval.embedder import Embedder  # loads sentence-transformers
        from lorag.retrieval.store import DocumentStore
        from lorag.state import Database

        self.store = DocumentStore(Database(state), cache_dir, Embedder(), chunk_tokens,
                                   chunk_overlap)
        self.tenant = tenant
        atexit.register(self.close)  # a command's indexes outlive it as snapshots

    def close(self) -> None:
        """Save the index snapshots this process changed; close the database."""
        self.store.close()
        self.store.db.close()

    def put_documents(self, namespace: str, documents: list) -> list[str]:
        """Add or replace documents; "added", "updated" or "unchanged" for each."""
        return self.store.put_documents(self._key(namespace), documents)

    def search(self, namespace: str, query: str, k: int = TOP_K, mode: str = SEARCH_MODE,
               filters: dict | None = None) -> list[dict]:
        """Hits as dicts (document_id, chunk_id, score, text, metadata)."""
        if not self.store.exists(self._key(namespace)):
            raise NotFound(f"namespace {namespace!r} does not exist", field="namespace")
        return [asdict(h) for h in self.store.search(self._key(namespace), query, k, filters,
                                                     mode)]

    def namespaces(self) -> list[dict]:
        """Every namespace in the state, all tenants': this is the operator's view."""
        return [{"name": tenancy.split(row["namespace"])[1],
                 "owner": tenancy.split(row["namespace"])[0] or "", "shared": row["shared"],
                 "documents": row["documents"], "chunks": row["chunks"]}
                for row in self.store.overview()]

    def drop_namespace(self, namespace: str) -> None:
        """Delete a namespace and everything in it."""
        if not self.store.drop_namespace(self._key(namespace)):
            raise NotFound(f"namespace {namespace!r} does not exist", field="namespace")

    def _key(self, namespace: str) -> str:
        return tenancy.key(self.tenant, check_name(namespace, "namespace", "namespace"))


def namespaces_at(url: str | None, api_key: str | None, data_dir: Path | None,
                  state: str | None, tenant: str, **chunking) -> "DaemonClient | StoreNamespaces":
    """The daemon at `url` when given, else `tenant`'s namespaces in the state database
    (`state`, default the data dir's SQLite file; index snapshots in the data dir)."""
    from lorag.state import state_url

    if url:
        return DaemonClient(url, api_key)
    folder = data_dir_or_default(data_dir)
    return StoreNamespaces(state_url(state, folder), folder / "retrieval", tenant, **chunking)


def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to ingest.")],
    namespace: Annotated[str, typer.Option(help="Namespace to ingest into.")],
    url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None, state: State = None,
    tenant: Tenant = "default",
    chunk_tokens: Annotated[int | None, typer.Option(
        min=16, help="Chunk size in the embedder's tokens (without --url; default 200).")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(
        min=0, help="Tokens consecutive chunks share (without --url; default 40).")] = None,
) -> None:
    """Chunk, embed and index documents (.txt .md .jsonl .html .pdf); unchanged ones are
    skipped. A file's document id is its path relative to the PATH it was found under."""
    from lorag.retrieval.ingest import files_under
    from lorag.retrieval.ingest import ingest as run

    chunking = given_only({"chunk_tokens": chunk_tokens, "chunk_overlap": chunk_overlap})
    if url and chunking:
        raise InvalidRequest("--chunk-tokens and --chunk-overlap apply without --url; a "
                             "daemon chunks as its `lorag serve --chunk-tokens` says",
                             field="chunk_tokens")
    files = list(files_under(paths))
    target = namespaces_at(url, api_key, data_dir, state, tenant, **chunking)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} files"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("ingesting", total=len(files))
        counts = run(target, namespace, paths,
                     lambda path, outcome: progress.update(task, advance=1,
                                                           description=path.name))
    console.print(f"{namespace}: {counts['added']} added, {counts['updated']} updated, "
                  f"{counts['unchanged']} unchanged, {len(counts['failed'])} failed")
    for failure in counts["failed"]:
        console.print(f"  [red]failed[/] {failure['file']}: {failure['reason']}")
    if counts["failed"]:
        raise SystemExit(1)


def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    namespace: Annotated[str, typer.Option(help="Namespace to search.")],
    k: Annotated[int, typer.Option(min=1, max=MAX_TOP_K, help="How many hits.")] = TOP_K,
    filter_: Annotated[list[str] | None, typer.Option(
        "--filter", help="key=value metadata filter (repeatable; same key twice = in).")] =
        None,
    mode: Annotated[str, typer.Option(help="vector, bm25 or hybrid (fused by RRF).")] =
        SEARCH_MODE,
    as_json: Annotated[bool, typer.Option("--json", help="Print hits as JSON.")] = False,
    url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None, state: State = None,
    tenant: Tenant = "default",
) -> None:
    """Search a namespace: BM25, vector, or both fused (the default)."""
    import json

    filters: dict[str, list[str]] = {}
    for item in filter_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--filter {item!r} must be key=value", field="filter")
        filters.setdefault(key, []).append(value)
    hits = namespaces_at(url, api_key, data_dir, state, tenant).search(namespace, query, k, mode,
                                                                filters or None)
    if as_json:
        print(json.dumps(hits, indent=2))
        return
    for hit in hits:
        console.print(f"[bold]{hit['score']:.3f}[/] {hit['document_id']} "
                      f"#{hit['chunk_id']}: {hit['text'][:160]}")


@namespaces_app.command("list")
def namespaces_list(url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None,
                    state: State = None) -> None:
    """Namespaces with their owner and document and chunk counts."""
    rows = namespaces_at(url, api_key, data_dir, state, "default").namespaces()
    table = Table("namespace", "owner", "shared", "documents", "chunks")
    for row in rows:
        table.add_row(row["name"], row["owner"], "yes" if row["shared"] else "",
                      str(row["documents"]), str(row["chunks"]))
    Console().print(table)


@namespaces_app.command("delete")
def namespaces_delete(
    namespace: Annotated[str, typer.Argument(help="The namespace to delete.")],
    url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None, state: State = None,
    tenant: Tenant = "default",
) -> None:
    """Delete a namespace with all its documents and its index."""
    namespaces_at(url, api_key, data_dir, state, tenant).drop_namespace(namespace)
    console.print(f"deleted namespace {namespace}")
