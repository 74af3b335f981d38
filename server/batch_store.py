"""The Batch API's durable state, in the state database (lorag/state): files, batches and
batch lines, each tenant's own.

A batch's lines are rows. A replica's runner (server/batches.py) claims pending lines in
one transaction (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas of a fleet never
claim the same line; SQLite serialises writers), holds each for a lease it renews while
the line runs, and records the result only while it still holds the line. A replica that
dies mid-line stops renewing: the lease runs out and another replica, or this one
restarted, claims the line again. A line that has a result is never run again, and a
result is written once.
"""

import time
from dataclasses import dataclass

from sqlalchemy import and_, delete, func, or_, select, update

from lorag.state import Database
from lorag.state.schema import batch_lines, batches, files, tenants

PENDING, RUNNING, DONE = "pending", "running", "done"


@dataclass(frozen=True)
class Claimed:
    """A line this replica now runs: which, for whom, and what it asks."""

    batch_id: str
    line: int
    tenant: str
    request: dict  # {"url", "body"}


class BatchStore:
    """Files, batches and lines; safe to call from any thread."""

    def __init__(self, db: Database):
        self.db = db

    # ---- files ----

    def put_file(self, tenant: str, file: dict, content: bytes) -> None:
        """Store an uploaded (or a batch's output) file; `file` is its object."""
        with self.db.write() as connection:
            connection.execute(self.db.insert_ignore(tenants).values(name=tenant,
                                                                    created=time.time()))
            connection.execute(files.insert().values(
                id=file["id"], tenant=tenant, purpose=file["purpose"],
                filename=file["filename"], bytes=file["bytes"], created=file["created_at"],
                content=content))

    def file(self, tenant: str, file_id: str) -> dict | None:
        with self.db.read() as connection:
            row = connection.execute(select(*_FILE).where(
                files.c.id == file_id, files.c.tenant == tenant)).first()
        return None if row is None else _file(row)

    def files(self, tenant: str, purpose: str | None = None) -> list[dict]:
        """`tenant`'s files, newest first."""
        query = select(*_FILE).where(files.c.tenant == tenant)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        with self.db.read() as connection:
            rows = connection.execute(query.order_by(files.c.created.desc())).all()
        return [_file(row) for row in rows]

    def content(self, tenant: str, file_id: str) -> bytes | None:
        with self.db.read() as connection:
            return connection.scalar(select(files.c.content).where(
                files.c.id == file_id, files.c.tenant == tenant))

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self.db.write() as connection:
            return connection.execute(delete(files).where(
                files.c.id == file_id, files.c.tenant == tenant)).rowcount > 0

    # ---- batches ----

    def create(self, tenant: str, batch: dict, lines: list[tuple[str, dict]]) -> None:
        """A batch and its lines ([(custom_id, request)]), in one transaction."""
        with self.db.write() as connection:
            connection.execute(batches.insert().values(id=batch["id"], tenant=tenant,
                                                       status=batch["status"], batch=batch))
            if lines:
                connection.execute(batch_lines.insert(), [
                    {"batch_id": batch["id"], "line": i, "custom_id": custom_id,
                     "request": request, "status": PENDING}
                    for i, (custom_id, request) in enumerate(lines)])

    def batch(self, tenant: str, batch_id: str) -> dict | None:
        """`tenant`'s batch's object, with its request counts now."""
        with self.db.read() as connection:
            batch = connection.scalar(select(batches.c.batch).where(
                batches.c.id == batch_id, batches.c.tenant == tenant))
            if batch is None:
                return None
            counts = dict(connection.execute(
                select(batch_lines.c.ok, func.count()).where(
                    batch_lines.c.batch_id == batch_id, batch_lines.c.status == DONE)
                .group_by(batch_lines.c.ok)).all())
            total = connection.scalar(select(func.count()).where(
                batch_lines.c.batch_id == batch_id))
        return {**batch, "request_counts": {"total": total,
                                            "completed": counts.get(True, 0),
                                            "failed": counts.get(False, 0)}}

    def batches(self, tenant: str, limit: int, after: str | None) -> list[dict]:
        """`tenant`'s batches, newest first, `limit` of them after the id `after`."""
        with self.db.read() as connection:
            rows = connection.execute(select(batches.c.id, batches.c.batch).where(
                batches.c.tenant == tenant)).all()
        rows.sort(key=lambda row: (-row[1]["created_at"], row[0]))
        ids = [row[0] for row in rows]
        start = ids.index(after) + 1 if after in ids else 0
        return [self.batch(tenant, batch_id) for batch_id in ids[start:start + limit]]

    def move(self, batch_id: str, to: str, when: tuple[str, ...],
             stale_before: float | None = None, **fields) -> dict | None:
        """Move a batch to status `to` (its object gains `fields`, and `<to>_at` now) if it
        is in one of `when` (since before `stale_before`, when given); the new object, or
        None when it was not (another replica moved it first, or it is elsewhere)."""
        with self.db.write() as connection:
            batch = connection.scalar(select(batches.c.batch).where(
                batches.c.id == batch_id, batches.c.status.in_(when)).with_for_update())
            if batch is None or stale_before is not None and \
                    (batch.get(f"{batch['status']}_at") or 0) >= stale_before:
                return None
            batch = {**batch, **fields, "status": to, f"{to}_at": int(time.time())}
            connection.execute(update(batches).where(batches.c.id == batch_id)
                               .values(status=to, batch=batch))
        return batch

    def open_batches(self) -> list[str]:
        """Every batch not ended yet, any tenant's."""
        with self.db.read() as connection:
            return list(connection.scalars(select(batches.c.id).where(
                batches.c.status.in_(("in_progress", "cancelling", "finalizing")))))

    def tenant_of(self, batch_id: str) -> str | None:
        with self.db.read() as connection:
            return connection.scalar(select(batches.c.tenant).where(batches.c.id == batch_id))

    def statuses(self, batch_ids: set[str]) -> dict[str, str]:
        with self.db.read() as connection:
            return dict(connection.execute(select(batches.c.id, batches.c.status).where(
                batches.c.id.in_(batch_ids))).all())

    # ---- lines ----

    def claim(self, owner: str, count: int, lease_s: float) -> list[Claimed]:
        """Up to `count` lines of in-progress batches, oldest batch first, that nobody
        holds (pending, or running past their lease), now held by `owner`."""
        now = time.time()
        free = or_(batch_lines.c.status == PENDING,
                   and_(batch_lines.c.status == RUNNING, batch_lines.c.lease < now))
        with self.db.write() as connection:
            rows = connection.execute(
                select(batch_lines.c.batch_id, batch_lines.c.line, batch_lines.c.request,
                       batches.c.tenant)
                .join(batches, batches.c.id == batch_lines.c.batch_id)
                .where(free, batches.c.status == "in_progress")
                .order_by(batches.c.id, batch_lines.c.line).limit(count)
                .with_for_update(of=batch_lines, skip_locked=True)).all()
            for batch_id, line, _, _ in rows:
                connection.execute(update(batch_lines).where(
                    batch_lines.c.batch_id == batch_id, batch_lines.c.line == line)
                    .values(status=RUNNING, owner=owner, lease=now + lease_s))
        return [Claimed(batch_id, line, tenant, request)
                for batch_id, line, request, tenant in rows]

    def renew(self, owner: str, lines: list[tuple[str, int]], lease_s: float) -> None:
        """Extend `owner`'s hold on `lines` (those it still holds)."""
        with self.db.write() as connection:
            for batch_id, line in lines:
                connection.execute(update(batch_lines).where(
                    *_held(owner, batch_id, line)).values(lease=time.time() + lease_s))

    def finish(self, owner: str, batch_id: str, line: int, result: dict) -> bool:
        """Record a line's result if `owner` still holds it; whether it did."""
        ok = 200 <= result["status_code"] < 300
        with self.db.write() as connection:
            return connection.execute(update(batch_lines).where(
                *_held(owner, batch_id, line)).values(
                status=DONE, result=result, ok=ok, owner=None, lease=None)).rowcount > 0

    def release(self, owner: str, lines: list[tuple[str, int]]) -> None:
        """Give lines back unrun (a replica stopping, a cancelled batch): pending again."""
        with self.db.write() as connection:
            for batch_id, line in lines:
                connection.execute(update(batch_lines).where(*_held(owner, batch_id, line))
                                   .values(status=PENDING, owner=None, lease=None))

    def unfinished(self, batch_id: str, pending: bool = True) -> int:
        """Lines of a batch without a result: running ones, and pending ones with
        `pending`."""
        states = [RUNNING, PENDING] if pending else [RUNNING]
        with self.db.read() as connection:
            return connection.scalar(select(func.count()).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.status.in_(states)))

    def results(self, batch_id: str) -> list[tuple[int, str, dict, bool]]:
        """(line, custom_id, result, ok) of every line with a result, in line order."""
        with self.db.read() as connection:
            return [tuple(row) for row in connection.execute(
                select(batch_lines.c.line, batch_lines.c.custom_id, batch_lines.c.result,
                       batch_lines.c.ok).where(batch_lines.c.batch_id == batch_id,
                                               batch_lines.c.status == DONE)
                .order_by(batch_lines.c.line)).all()]


_FILE = (files.c.id, files.c.purpose, files.c.filename, files.c.bytes, files.c.created)


def _file(row) -> dict:
    file_id, purpose, filename, size, created = row
    return {"id": file_id, "object": "file", "bytes": size, "created_at": int(created),
            "filename": filename, "purpose": purpose, "status": "processed",
            "expires_at": None, "status_details": None}


def _held(owner: str, batch_id: str, line: int) -> tuple:
    return (batch_lines.c.batch_id == batch_id, batch_lines.c.line == line,
            batch_lines.c.status == RUNNING, batch_lines.c.owner == owner)
