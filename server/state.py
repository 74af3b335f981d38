"""Tenants, the adapters they registered and the responses they stored, in the state
database (lorag/state).

A row is written only after the engine has read and validated the adapter, in one
transaction, so a crash in the middle of a load leaves either no row (the load never
happened) or a complete one (it is known after a restart and read again lazily on first
use). Every replica on one database sees the same rows: `version` (the adapter's content
digest at registration) tells a replica holding other weights under that name to reload.
"""

import time
from dataclasses import dataclass

from sqlalchemy import delete, func, or_, select, update

from lorag.server import tenancy
from lorag.state import Database
from lorag.state.schema import adapters, responses, rollout_keys, rollouts, tenants


@dataclass(frozen=True)
class AdapterRecord:
    """A registered adapter: who owns it, what the owner calls it, where it lives, and
    which content it had when registered."""

    tenant: str
    name: str
    path: str
    shared: bool
    version: str = ""

    @property
    def key(self) -> str:
        """The engine's name for it: unique across tenants (server/tenancy.py)."""
        return tenancy.key(self.tenant, self.name)


COLUMNS = (adapters.c.tenant, adapters.c.name, adapters.c.path, adapters.c.shared,
           adapters.c.version)


class StateStore:
    """Tenants and adapter records; safe to call from any thread."""

    def __init__(self, db: Database):
        self.db = db

    def ensure_tenant(self, name: str) -> None:
        """Record a tenant (idempotent)."""
        with self.db.write() as connection:
            connection.execute(self.db.insert_ignore(tenants).values(name=name,
                                                                    created=time.time()))

    def tenants(self) -> list[str]:
        """Every tenant ever seen, sorted."""
        with self.db.read() as connection:
            return list(connection.scalars(select(tenants.c.name).order_by(tenants.c.name)))

    def put_adapter(self, record: AdapterRecord) -> None:
        """Insert or replace one adapter record, atomically, and tell the other replicas."""
        values = {"path": record.path, "shared": record.shared, "version": record.version,
                  "created": time.time()}
        with self.db.write() as connection:
            connection.execute(self.db.insert_ignore(tenants).values(name=record.tenant,
                                                                    created=time.time()))
            replaced = connection.execute(update(adapters).where(
                adapters.c.tenant == record.tenant, adapters.c.name == record.name)
                .values(**values)).rowcount
            if not replaced:
                connection.execute(adapters.insert().values(tenant=record.tenant,
                                                            name=record.name, **values))
            self.db.notify(connection, "adapters", record.key)

    def delete_adapter(self, tenant: str, name: str) -> bool:
        """Remove a record; says whether there was one."""
        with self.db.write() as connection:
            gone = connection.execute(delete(adapters).where(
                adapters.c.tenant == tenant, adapters.c.name == name)).rowcount
            self.db.notify(connection, "adapters", tenancy.key(tenant, name))
            return gone > 0

    def adapters(self) -> list[AdapterRecord]:
        """Every adapter record, by tenant then name."""
        with self.db.read() as connection:
            rows = connection.execute(select(*COLUMNS).order_by(adapters.c.tenant,
                                                                adapters.c.name)).all()
        return [AdapterRecord(*row) for row in rows]

    def visible_adapter(self, tenant: str, name: str) -> AdapterRecord | None:
        """The record `name` means to `tenant`: its own, else the one shared under that
        name (server/tenancy.py's rule), else None."""
        with self.db.read() as connection:
            rows = connection.execute(select(*COLUMNS).where(
                adapters.c.name == name,
                or_(adapters.c.tenant == tenant, adapters.c.shared))).all()
        records = [AdapterRecord(*row) for row in rows]
        return next((r for r in records if r.tenant == tenant), records[0] if records else None)

    def put_response(self, tenant: str, response: dict, messages: list[dict]) -> None:
        """Store a response object (its `id` is the key) and the chat messages of its
        conversation, for GET /v1/responses/{id} and previous_response_id."""
        with self.db.write() as connection:
            connection.execute(responses.insert().values(
                id=response["id"], tenant=tenant, created=time.time(), response=response,
                messages=messages))

    def response(self, tenant: str, response_id: str) -> tuple[dict, list[dict]] | None:
        """`tenant`'s stored response and its conversation's messages; None when it has
        none by that id (another tenant's included)."""
        with self.db.read() as connection:
            row = connection.execute(select(responses.c.response, responses.c.messages).where(
                responses.c.id == response_id, responses.c.tenant == tenant)).first()
        return None if row is None else (row[0], row[1])

    def delete_response(self, tenant: str, response_id: str) -> bool:
        """Remove one of `tenant`'s stored responses; says whether there was one."""
        with self.db.write() as connection:
            return connection.execute(delete(responses).where(
                responses.c.id == response_id, responses.c.tenant == tenant)).rowcount > 0

    def put_rollout(self, tenant: str, name: str, versions: dict[str, int]) -> None:
        """Serve `tenant`'s `name` by `versions` ({version: weight}) from now on, on every
        replica (each reads it per request); the keys are given versions afresh."""
        with self.db.write() as connection:
            _clear_rollout(connection, tenant, name)
            connection.execute(rollouts.insert().values(tenant=tenant, name=name,
                                                        versions=versions,
                                                        updated=time.time()))

    def rollout(self, tenant: str, name: str) -> dict[str, int] | None:
        with self.db.read() as connection:
            return connection.scalar(select(rollouts.c.versions).where(
                rollouts.c.tenant == tenant, rollouts.c.name == name))

    def delete_rollout(self, tenant: str, name: str) -> bool:
        with self.db.write() as connection:
            return _clear_rollout(connection, tenant, name)

    def rollout_version(self, tenant: str, name: str, key_id: str,
                        versions: dict[str, int]) -> str:
        """The version of `name` the key `key_id` gets: the one it was given (a read, the
        common case), else the version furthest below its share of the keys given one so
        far (so a few dozen keys already split as the weights say), recorded for every
        replica."""
        with self.db.read() as connection:
            given = _given_version(connection, tenant, name, key_id)
        if given is not None:
            return given
        with self.db.write() as connection:
            given = _given_version(connection, tenant, name, key_id)  # meanwhile?
            if given is not None:
                return given
            counts = dict(connection.execute(
                select(rollout_keys.c.version, func.count()).where(
                    rollout_keys.c.tenant == tenant, rollout_keys.c.name == name)
                .group_by(rollout_keys.c.version)).all())
            keys, total = sum(counts.values()) + 1, sum(versions.values())
            version = max(sorted(versions), key=lambda v: versions[v] / total * keys
                          - counts.get(v, 0))
            connection.execute(self.db.insert_ignore(rollout_keys).values(
                tenant=tenant, name=name, key_id=key_id, version=version))
            return _given_version(connection, tenant, name, key_id)


def _given_version(connection, tenant: str, name: str, key_id: str) -> str | None:
    """The version of `name` key `key_id` was given under the current rollout, if any."""
    return connection.scalar(select(rollout_keys.c.version).where(
        rollout_keys.c.tenant == tenant, rollout_keys.c.name == name,
        rollout_keys.c.key_id == key_id))


def _clear_rollout(connection, tenant: str, name: str) -> bool:
    """Delete `tenant`'s rollout of `name` and the versions its keys were given; whether
    there was one."""
    connection.execute(delete(rollout_keys).where(rollout_keys.c.tenant == tenant,
                                                  rollout_keys.c.name == name))
    return connection.execute(delete(rollouts).where(
        rollouts.c.tenant == tenant, rollouts.c.name == name)).rowcount > 0
