"""Adapters behind tenants, by the rule in server/tenancy.py, kept in step with the state
database across a fleet.

The state database holds every registration (an `AdapterRecord`: tenant, name, folder,
shared, content version); this replica's engine serves the records it has installed
(`records`, by engine key). Every request brings the engine to the database first
(`key_for`): a registration made on another replica is installed (read on first use), a
re-registration replaces the weights, an unload forgets them. `sync` does the same for
every record at once, when another replica's commit is notified or polled.
"""

import json
import logging
import threading
import time
from pathlib import Path

from lorag.adapters import AdapterKey, Composition, adapter_kind, confine, content_version
from lorag.errors import (
    AdapterChanged,
    AdapterNotFound,
    InvalidRequest,
    LoragError,
    NotFound,
    Unavailable,
)
from lorag.names import check_adapter_name
from lorag.retrieval.rag import RAG_LAYOUT
from lorag.server import tenancy
from lorag.server.backend import Backend
from lorag.server.limits import RequestLimits
from lorag.server.metrics import Metrics
from lorag.server.sources import AdapterCache, is_remote
from lorag.server.state import AdapterRecord, StateStore
from lorag.server.tenancy import Caller

log = logging.getLogger("lorag.adapters")
MAX_VERSIONS = 16  # versions one rollout splits a name between


class AdapterRecords:
    """Tenant-scoped adapter registration, use and status over one engine."""

    def __init__(self, engine: Backend, store: StateStore, limits: RequestLimits,
                 metrics: Metrics, model_name: str, cache: AdapterCache | None = None,
                 source: str | None = None):
        self.engine, self.store, self.limits = engine, store, limits
        self.metrics, self.model_name = metrics, model_name
        self.cache = cache  # where adapters from remote sources are fetched to
        # where an unregistered adapter a request names is looked for (<source>/<tenant>/
        # <name>: vLLM's LoRA resolvers), when set
        self.source = source.rstrip("/") if source else None
        # engine key -> the record the engine serves under it; the state database is the
        # truth, and every request brings this replica's engine to it (`_current`)
        self.records: dict[str, AdapterRecord] = {}
        self.lock = threading.Lock()  # orders loads/unloads with their records
        self.layout_checked: set[tuple[str, str]] = set()  # (key, version) checked
        for record in store.adapters():  # a restart: known again, read on first use
            try:
                self._install(record, lazy=True)
            except LoragError as e:  # a source unreachable now: tried again on first use
                log.warning("adapter %s not restored: %s", record.key, e.message)

    def load(self, caller: Caller, name: str, path: str, shared: bool = False) -> bool:
        """Register `path` as the caller tenant's adapter `name` (again: other weights
        replace the ones served under that name, on every replica); True if newly loaded."""
        tenancy.require_admin(caller, "load adapters")
        check_adapter_name(name, "name")  # a name, or name@version
        if name == self.model_name:
            raise InvalidRequest(f"{name!r} is the base model's name", field="name")
        if caller.adapter_roots is not None and not is_remote(path):
            confine(path, list(caller.adapter_roots))  # this key's folders, within the roots
        return self._register(caller.tenant, name, str(path), bool(shared))

    def _register(self, tenant: str, name: str, path: str, shared: bool) -> bool:
        """Read, validate and record `path` as `tenant`'s adapter `name`."""
        fetched = is_remote(path) and self.cache is not None and not self.cache.cached(path)
        local = self.local(path)  # a remote source's: fetched, or found cached
        try:
            return self._record(tenant, name, path, local, shared)
        except LoragError:
            if fetched and not any(r.path == path for r in self.records.values()):
                self.cache.drop(path)  # refused (another base, bad weights): not kept
            raise

    def _record(self, tenant: str, name: str, path: str, local: str, shared: bool) -> bool:
        """`_register` once `path`'s files are local."""
        key = tenancy.key(tenant, name)
        version = content_version(local, list(self.engine.limits.adapter_roots))
        record = AdapterRecord(tenant, name, path, shared, version)
        with self.lock:
            owned = [r.name for r in self.store.adapters() if r.tenant == tenant]
            if name not in owned:
                self.limits.check_adapters(tenant, len(owned))
            if shared:
                tenancy.check_shared_name(key, self._shared(), "adapter", "name")
            start = time.perf_counter()
            try:
                loaded = self._install(record, lazy=False)  # reads + validates
            except AdapterChanged as e:
                raise AdapterChanged(f"the files at {path} changed while they were being "
                                     "registered; register them once they are written",
                                     field="path") from e
            self.metrics.adapter_load.observe(time.perf_counter() - start)
            # the row is written only after validation: a crash before this line leaves
            # no trace; after it, a complete record
            self.store.put_adapter(record)
        return loaded

    def unload(self, caller: Caller, name: str) -> None:
        """Forget the caller tenant's adapter `name` (running requests finish). Once this
        returns, no replica admits another request on it: each checks the record first."""
        tenancy.require_admin(caller, "unload adapters")
        with self.lock:
            if not self.store.delete_adapter(caller.tenant, name):
                raise AdapterNotFound.named(name, "name")
            self._forget(tenancy.key(caller.tenant, name))

    def pin(self, caller: Caller, name: str, pinned: bool) -> None:
        """Keep one of the caller's adapters in a compute slot, or let it go again."""
        tenancy.require_admin(caller, "pin adapters")
        key = self._key(caller, name, "name")
        if pinned:
            self.engine.pin_adapter(key)
        else:
            self.engine.unpin_adapter(key)
        path = self.records[key].path
        if self.cache is not None and is_remote(path) and self.cache.cached(path):
            self.cache.pin(self.cache.cached(path), pinned)  # its files stay fetched too

    def visible(self, caller: Caller) -> list[dict]:
        """The adapters the caller can use, with their status in this replica's engine."""
        rows = {row["name"]: row for row in self.engine.list_adapters()}
        out = []
        for record in sorted(self.store.adapters(), key=lambda record: record.name):
            if not tenancy.visible(caller, record.key, record.shared):
                continue
            held = self.records.get(record.key) == record
            row = rows.get(record.key, {}) if held else {}
            out.append({"name": record.name, "path": record.path, "shared": record.shared,
                        "owner": record.tenant, "kind": self._kind(record),
                        "in_ram": row.get("in_ram", False),
                        "active": row.get("active", False),
                        "pinned": row.get("pinned", False),
                        "running_requests": row.get("running_requests", 0)})
        return out

    def get(self, caller: Caller, name: str) -> dict:
        """One adapter's status, or AdapterNotFound."""
        for row in self.visible(caller):
            if row["name"] == name:
                return row
        raise AdapterNotFound.named(name, "name")

    def key_for(self, caller: Caller, model: str,
                adapters: list[tuple[str, float]] | None) -> AdapterKey | None:
        """The engine key a request runs on: None for the base model, the caller's
        adapter named `model`, or a Composition of the caller's adapters."""
        if not adapters:
            return self.named(caller, model, "model")
        if model != self.model_name:
            raise InvalidRequest("give either an adapter as `model` or `adapters`, not both; "
                                 f"with `adapters`, set `model` to the base model "
                                 f"{self.model_name!r}", field="adapters")
        return Composition(tuple((self._key(caller, name, "adapters"), weight)
                                 for name, weight in adapters))

    def named(self, caller: Caller, name: str, field: str) -> str | None:
        """The engine key of the caller's adapter `name` (None: the base model's name);
        an error names the request's `field`."""
        return None if name == self.model_name else self._key(caller, name, field)

    def check_layout(self, adapter: AdapterKey | None) -> None:
        """Before a `rag` chat on `adapter`: warn once per adapter (and content version)
        trained by RAFT on another RAG prompt layout than the daemon's, which it will
        answer less well in (its training.json says which)."""
        names = adapter.names if isinstance(adapter, Composition) else \
            [] if adapter is None else [adapter]
        for name in names:
            record = self.records.get(name)
            if record is None or (name, record.version) in self.layout_checked:
                continue
            self.layout_checked.add((name, record.version))
            trained = None if is_remote(record.path) else _rag_layout(Path(record.path))
            if trained is not None and trained != RAG_LAYOUT:
                log.warning("adapter %s was trained (RAFT) on RAG prompt layout %r; this "
                            "daemon lays out %r: retrain it for this layout for its best "
                            "answers", name, trained, RAG_LAYOUT)

    def sync(self) -> None:
        """Bring this replica's engine to every record in the state database: what
        `key_for` does per request, for all of them at once (a notification or a poll),
        so that unloaded weights leave memory without waiting for a request."""
        with self.lock:  # read under the lock: a load's commit is never half seen
            records = {record.key: record for record in self.store.adapters()}
            for key in [key for key in self.records if key not in records]:
                self._forget(key)
            for key, record in records.items():
                if self.records.get(key) != record:
                    self._install(record, lazy=True)

    def _key(self, caller: Caller, name: str, field: str) -> str:
        """The engine key of the adapter `name` means to the caller, as the state database
        has it now, with this replica's engine brought to it. While the database cannot
        be reached, the records last seen here serve: no unload can commit meanwhile."""
        try:
            name = self._version(caller, name)
            record = self._current(caller, name)
        except Unavailable:
            key = self._held(caller, name)
            record = None if key is None else self.records[key]
        if record is None and self.source is not None:
            record = self._resolve(caller, name, field)
        if record is None:
            raise AdapterNotFound(f"model {name!r} is neither the base model "
                                  f"({self.model_name!r}) nor a loaded adapter; list them at "
                                  "GET /v1/models", field=field)
        if self.cache is not None and is_remote(record.path):
            self._fetched(record)
        return record.key

    def _fetched(self, record: AdapterRecord) -> None:
        """A remote adapter's files in the cache for a request on it: marked used (least
        recently used goes first), or fetched again where the cache evicted them (the
        engine checks that they still hold the registered content version when it reads
        them)."""
        try:
            self.cache.local(record.path)
        except NotFound as e:
            raise Unavailable(f"adapter {record.name!r} left the adapter cache and is no "
                              f"longer at {record.path} ({e.message}); register it again "
                              "or unload it") from None

    def _version(self, caller: Caller, name: str) -> str:
        """`name`, or under a rollout of the caller's tenant the version of it this
        caller's key gets (`name@version`: the same every time until the rollout
        changes; server/state.py `rollout_version`)."""
        if "@" in name:
            return name
        versions = self.store.rollout(caller.tenant, name)
        if not versions:
            return name
        version = self.store.rollout_version(caller.tenant, name,
                                             caller.key_id or caller.tenant, versions)
        return f"{name}@{version}"

    def rollout(self, caller: Caller, name: str, versions: dict[str, int]) -> dict:
        """Serve the caller tenant's `name` by weighted versions (each `name@version`
        registered), on every replica from their next request; weights are relative."""
        tenancy.require_admin(caller, "roll out adapters")
        check_adapter_name(name, "name")
        if "@" in name or not versions or len(versions) > MAX_VERSIONS:
            raise InvalidRequest(f"a rollout splits a name without @ between 1 and "
                                 f"{MAX_VERSIONS} of its versions", field="versions")
        registered = {record.name for record in self.store.adapters()
                      if record.tenant == caller.tenant}
        for version, weight in versions.items():
            if f"{name}@{version}" not in registered:
                raise AdapterNotFound(f"{name}@{version} is not one of your adapters: "
                                      "register each version first", field="versions")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise InvalidRequest(f"versions.{version}: a weight is an integer >= 0, "
                                     f"got {weight!r}", field=f"versions.{version}")
        if sum(versions.values()) <= 0:
            raise InvalidRequest("versions: at least one weight must be above 0",
                                 field="versions")
        self.store.put_rollout(caller.tenant, name, dict(versions))
        return {"name": name, "versions": dict(versions)}

    def _resolve(self, caller: Caller, name: str, field: str) -> AdapterRecord:
        """Register the caller tenant's adapter `name` from the adapter source, where a
        request named it first (concurrent first requests: one fetch, the others wait)."""
        url = f"{self.source}/{caller.tenant}/{check_adapter_name(name, field)}"
        try:
            self._register(caller.tenant, name, url, shared=False)
        except NotFound as e:
            raise AdapterNotFound(f"model {name!r} is neither the base model "
                                  f"({self.model_name!r}), a loaded adapter, nor in the "
                                  f"adapter source (looked at {url}: {e.message})",
                                  field=field) from None
        return self.store.visible_adapter(caller.tenant, name)

    def _current(self, caller: Caller, name: str) -> AdapterRecord | None:
        """The record `name` means to the caller in the state database, installed here
        (or forgotten here, when it went)."""
        record = self.store.visible_adapter(caller.tenant, name)
        if record is not None and self.records.get(record.key) == record:
            return record  # the common case: no lock, one primary-key read
        with self.lock:  # read again under the lock: a load may have committed meanwhile
            record = self.store.visible_adapter(caller.tenant, name)
            if record is None:  # unloaded (maybe elsewhere): whatever was held goes
                key = self._held(caller, name)
                if key is not None:
                    self._forget(key)
            elif self.records.get(record.key) != record:
                self._install(record, lazy=True)
        return record

    def _install(self, record: AdapterRecord, lazy: bool) -> bool:
        """Serve `record` under its key, replacing other weights held there (caller holds
        the lock, or is the constructor)."""
        known = self.records.pop(record.key, None)
        if known is not None and (known.path, known.version) != (record.path, record.version):
            self.engine.unload_adapter(record.key)
        loaded = self.engine.load_adapter(record.key, self.local(record.path), lazy=lazy,
                                          version=record.version or None)
        self.records[record.key] = record
        return loaded

    def local(self, path: str) -> str:
        """The local folder of a registration's path: itself, or for a remote source its
        copy in the adapter cache (fetched now if it is not there)."""
        if not is_remote(path):
            return path
        if self.cache is None:
            raise InvalidRequest(f"lora_path {path!r} names a remote source, and this "
                                 "daemon has no adapter cache to fetch it into",
                                 field="path")
        return str(self.cache.local(path))

    def _kind(self, record: AdapterRecord) -> str:
        """An adapter's kind, from its local files (a remote one's cached copy, if the
        cache holds it: a listing fetches nothing)."""
        if not is_remote(record.path):
            return adapter_kind(record.path)
        folder = None if self.cache is None else self.cache.cached(record.path)
        return "unknown" if folder is None else adapter_kind(folder)

    def _forget(self, key: str) -> None:
        """Stop serving `key` on this replica (caller holds the lock)."""
        if self.records.pop(key, None) is not None:
            self.engine.unload_adapter(key)

    def _held(self, caller: Caller, name: str) -> str | None:
        """The key `name` means to the caller among the records this replica holds."""
        shared = [key for key, record in self.records.items() if record.shared]
        return tenancy.resolve(caller, name, self.records.__contains__, shared)

    def _shared(self) -> list[str]:
        return [record.key for record in self.store.adapters() if record.shared]


def _rag_layout(folder: Path) -> str | None:
    """The RAG layout an adapter was trained on, from its training.json (None: none
    recorded, or no readable record)."""
    try:
        record = json.loads((folder / "training.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rag = record.get("rag") if isinstance(record, dict) else None
    return rag.get("layout") if isinstance(rag, dict) else None
