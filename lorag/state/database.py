"""The state database: SQLite under the data dir (one box), or PostgreSQL (a fleet).

SQLAlchemy Core writes the SQL once for both dialects (upserts, JSON paths, identity
columns, `RETURNING`), pools connections and re-connects after a lost connection
(`pool_pre_ping`); psycopg 3 is the PostgreSQL driver. Alembic applies the versioned
migrations in migrations/versions/ on open: an empty database gets the whole schema, an
older one (a data dir from before this module, included) is brought up to date, and a
database whose schema is newer than this code knows is refused.

Every read and write goes through `read()` / `write()`: one transaction each, and a lost
database surfaces as `Unavailable` (503 / UNAVAILABLE), never as a half-done write. A
write is acknowledged only after its commit returned.
"""

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Table, create_engine, event, exc, func, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url

from lorag.errors import InvalidRequest, Unavailable

log = logging.getLogger("lorag.state")
CHANNEL = "lorag_state"  # PostgreSQL NOTIFY channel: payload "<topic>:<name>"
BASELINE = "0001"  # the schema of data dirs made before migrations existed
MIGRATIONS = Path(__file__).parent / "migrations"
URL_RULE = "sqlite:///PATH or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
CONNECT_TIMEOUT_S = 5  # a PostgreSQL that does not answer fails a request in seconds
BACKOFF_S = (0.5, 10.0)  # the follower's reconnection delay: first, and the cap
SQLITE_FULL = "database or disk is full"  # SQLite's SQLITE_FULL: the transaction rolled back
OnChange = Callable[[str | None, str | None], None]  # (topic, name); (None, None): poll


def state_url(value: str | None, data_dir: Path) -> str:
    """The state URL `--state` / LORAG_STATE names; the default is SQLite in `data_dir`."""
    return value or f"sqlite:///{Path(data_dir).expanduser() / 'lorag.db'}"


class Database:
    """One state database; safe to share between threads (a connection pool)."""

    def __init__(self, url: str):
        self.url = _parse(url)
        self.name = self.url.render_as_string(hide_password=True)
        if self.url.get_backend_name() == "sqlite":
            path = Path(self.url.database or "")
            if not self.url.database or self.url.database == ":memory:":
                raise InvalidRequest(f"state must be a file: {URL_RULE}", field="state")
            path.expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url, connect_args={
                "check_same_thread": False, "timeout": 30})
            _sqlite_transactions(self.engine)
        else:
            self.engine = create_engine(self.url, pool_pre_ping=True, connect_args={
                "connect_timeout": CONNECT_TIMEOUT_S})
        self.dialect = self.engine.dialect.name
        try:
            self._migrate()
        except Exception:
            self.engine.dispose()
            raise

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot (SQLite's WAL; PostgreSQL's
        REPEATABLE READ)."""
        with self._connection(write=False) as connection:
            yield connection

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed on leaving the block (rolled back on an error).
        SQLite takes its write lock at BEGIN, so two writers queue instead of failing."""
        with self._connection(write=True) as connection:
            yield connection

    def insert_ignore(self, table: Table):
        """INSERT ... that skips a row whose key exists, in this dialect."""
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        return dialect.insert(table).on_conflict_do_nothing()

    def notify(self, connection: Connection, topic: str, name: str) -> None:
        """Tell the other replicas `topic` (documents, adapters) changed for `name`, when
        this transaction commits (PostgreSQL NOTIFY; SQLite readers poll)."""
        if self.dialect == "postgresql":
            connection.execute(select(func.pg_notify(CHANNEL, f"{topic}:{name}")))

    def follow(self, on_change: OnChange, interval: float) -> "Follower":
        """Call `on_change(topic, name)` for each change another replica commits
        (PostgreSQL LISTEN), and `on_change(None, None)` every `interval` seconds and after
        a reconnection (a poll: a lost notification costs latency, never correctness)."""
        return Follower(self, on_change, interval)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    @contextmanager
    def _connection(self, write: bool) -> Iterator[Connection]:
        try:
            with self.engine.connect() as connection:
                connection.execution_options(lorag_write=write)
                if not write and self.dialect == "postgresql":
                    connection.execution_options(isolation_level="REPEATABLE READ")
                with connection.begin():
                    yield connection
        except (exc.OperationalError, exc.InterfaceError) as e:
            reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
            if self.dialect == "sqlite" and SQLITE_FULL in reason:  # rolled back: nothing
                raise Unavailable(f"the state database {self.name} cannot be written: its "
                                  "disk is full; nothing of this request was stored. Retry "
                                  "once space is freed", field="state") from e
            if self.dialect == "sqlite" and "locked" not in reason:
                raise  # a broken statement on SQLite is a bug, not an outage
            raise Unavailable(f"the state database {self.name} cannot be reached: {reason}",
                              field="state") from e

    def _migrate(self) -> None:
        """Bring the schema to this code's version (Alembic), or refuse a newer one."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        scripts = ScriptDirectory.from_config(config)
        known = {revision.revision for revision in scripts.walk_revisions()}
        with self.write() as connection:
            if self.dialect == "postgresql":  # replicas starting together migrate once
                connection.execute(select(func.pg_advisory_xact_lock(0x6C6F726167)))
            current = MigrationContext.configure(connection).get_current_revision()
            if current is not None and current not in known:
                raise InvalidRequest(
                    f"the state database {self.name} has schema version {current}, newer "
                    f"than this lorag knows (up to {scripts.get_current_head()}): upgrade "
                    "lorag, or point --state at another database", field="state")
            config.attributes["connection"] = connection
            if current is None and inspect(connection).has_table("tenants"):
                command.stamp(config, BASELINE)  # a data dir from before migrations
            if current != scripts.get_current_head():
                log.info("migrating the state database %s from %s to %s", self.name,
                         current or "empty", scripts.get_current_head())
                command.upgrade(config, "head")


class Follower:
    """The thread behind `Database.follow`; `stop()` ends it within one interval."""

    def __init__(self, db: Database, on_change: OnChange, interval: float):
        self.db, self.on_change, self.interval = db, on_change, interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lorag-state-follower",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=self.interval + CONNECT_TIMEOUT_S + 1)

    def _run(self) -> None:
        if self.db.dialect != "postgresql":  # SQLite: other processes are polled
            while not self.stopping.wait(self.interval):
                self._call(None, None)
            return
        delay = BACKOFF_S[0]
        while not self.stopping.is_set():
            try:
                self._listen()
            except psycopg.Error as e:
                log.warning("state database %s: following changes failed (%s); retrying in "
                            "%.1f s", self.db.name, str(e).strip().splitlines()[0], delay)
                if self.stopping.wait(delay):
                    return
                delay = min(2 * delay, BACKOFF_S[1])
                continue
            delay = BACKOFF_S[0]

    def _listen(self) -> None:
        conninfo = self.db.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        with psycopg.connect(conninfo, autocommit=True,
                             connect_timeout=CONNECT_TIMEOUT_S) as connection:
            connection.execute(f"LISTEN {CHANNEL}")
            self._call(None, None)  # whatever happened while not listening
            while not self.stopping.is_set():
                for notice in connection.notifies(timeout=self.interval):
                    topic, _, name = notice.payload.partition(":")
                    self._call(topic, name)
                self._call(None, None)
                connection.execute("SELECT 1")  # a dead server is noticed here

    def _call(self, topic: str | None, name: str | None) -> None:
        try:
            self.on_change(topic, name)
        except Unavailable:
            pass  # the database went away meanwhile: the next poll catches up
        except Exception:
            log.exception("state database %s: applying a change failed", self.db.name)


def _parse(url: str) -> URL:
    """A state URL checked: SQLite or PostgreSQL (through psycopg 3)."""
    try:
        parsed = make_url(url)
    except (exc.ArgumentError, ValueError) as e:
        raise InvalidRequest(f"state must be {URL_RULE}, got {url!r}", field="state") from e
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and parsed.drivername == "sqlite":
        return parsed
    raise InvalidRequest(f"state must be {URL_RULE}, got {url!r}", field="state")


def _sqlite_transactions(engine) -> None:
    """SQLite as a transactional database: pysqlite's own BEGIN handling is off (it would
    not start a transaction for reads), every transaction begins explicitly, and a write
    takes the write lock at BEGIN (IMMEDIATE) so it never fails upgrading a read lock."""
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        for pragma in ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=30000"):
            dbapi_connection.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _begin(connection):
        write = connection.get_execution_options().get("lorag_write", True)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
