"""The daemon's durable state in SQLite: tenants and the adapters they registered.

One file under the data dir (`lorag.db`). A row is written only after the engine has read
and validated the adapter, in one transaction, so a crash in the middle of a load leaves
either no row (the load never happened) or a complete one (it is known after a restart
and read again lazily on first use).
"""

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lorag.server import tenancy

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (
    tenant TEXT NOT NULL REFERENCES tenants(name),
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    shared INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
"""


@dataclass(frozen=True)
class AdapterRecord:
    """A registered adapter: who owns it, what the owner calls it, where it lives."""

    tenant: str
    name: str
    path: str
    shared: bool

    @property
    def key(self) -> str:
        """The engine's name for it: unique across tenants (server/tenancy.py)."""
        return tenancy.key(self.tenant, self.name)


class StateStore:
    """Tenants and adapter records in SQLite; safe to call from any thread."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "lorag.db"
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def ensure_tenant(self, name: str) -> None:
        """Record a tenant (idempotent)."""
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO tenants VALUES (?, ?)", (name, time.time()))

    def tenants(self) -> list[str]:
        """Every tenant ever seen, sorted."""
        with self.lock:
            return [row[0] for row in self.db.execute("SELECT name FROM tenants ORDER BY name")]

    def put_adapter(self, record: AdapterRecord) -> None:
        """Insert or replace one adapter record, atomically."""
        with self.lock, self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT OR IGNORE INTO tenants VALUES (?, ?)",
                            (record.tenant, time.time()))
            self.db.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?)",
                            (record.tenant, record.name, record.path, int(record.shared),
                             time.time()))

    def delete_adapter(self, tenant: str, name: str) -> bool:
        """Remove a record; says whether there was one."""
        with self.lock:
            cursor = self.db.execute("DELETE FROM adapters WHERE tenant = ? AND name = ?",
                                     (tenant, name))
            return cursor.rowcount > 0

    def adapters(self) -> list[AdapterRecord]:
        """Every adapter record, by tenant then name."""
        with self.lock:
            rows = self.db.execute("SELECT tenant, name, path, shared FROM adapters "
                                   "ORDER BY tenant, name").fetchall()
        return [AdapterRecord(t, n, p, bool(s)) for t, n, p, s in rows]

    def close(self) -> None:
        """Close the database file."""
        with self.lock:
            self.db.close()
