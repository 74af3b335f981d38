"""OpenAI's Batch API: /v1/files (purpose `batch`) and /v1/batches, run by every replica's
`BatchRunner` at a lower priority than interactive requests.

A batch's input file is JSONL, one request per line: `{"custom_id", "method": "POST",
"url", "body"}` with `url` the batch's endpoint (chat completions, completions or
embeddings) and `body` what that route takes, lorag's extensions (`adapters`, `rag`)
included. Creating a batch checks every line (the same bodies the routes validate; a
batch with a bad line fails at once, each bad line named in `errors`) and writes the lines
to the state database (server/batch_store.py). Runners claim lines, run each through the
same Service call its route makes, as the batch's tenant, with the engine's batch
priority (a waiting interactive request is admitted first), and record each result as
the route's response body with its status. When no line is left, one replica writes the
output file (results with status 200) and the error file (the others), in line order, in
OpenAI's shape: `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`. A restarted replica, or another one, takes over the lines a dead one held
once their lease runs out; finished lines are never run again.
"""

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from lorag.errors import InvalidRequest, LoragError, NotFound, Overloaded
from lorag.server.backend import BATCH_PRIORITY
from lorag.server.batch_store import BatchStore, Claimed
from lorag.server.errors import mapping, openai_error, public_message
from lorag.server.openai_api import ChatBody, CompletionBody, EmbeddingsBody, RouteBody
from lorag.server.openai_responses import collected
from lorag.server.service import Service
from lorag.server.tenancy import Caller

log = logging.getLogger("lorag.batches")
ENDPOINTS = {"/v1/chat/completions": ChatBody, "/v1/completions": CompletionBody,
             "/v1/embeddings": EmbeddingsBody}
MAX_LINES = 50_000  # requests one batch may hold (OpenAI's limit)
MAX_ERRORS = 100  # bad lines a failed batch names
WINDOW_S = 24 * 3600  # completion_window "24h"
CONCURRENCY = 4  # lines a replica runs at once
LEASE_S = 30.0  # how long a claimed line stays a replica's without a renewal


class BatchBody(RouteBody):
    """POST /v1/batches."""

    input_file_id: str = Field(min_length=1)
    endpoint: Literal[tuple(ENDPOINTS)]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class _Line(BaseModel):
    """One line of an input file."""

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: str
    body: dict


class Batches:
    """Files and batches per tenant: create, read, cancel, and finish them."""

    def __init__(self, service: Service):
        self.service = service
        self.store: BatchStore = service.batches

    # ---- files ----

    def upload(self, caller: Caller, filename: str, purpose: str, content: bytes) -> dict:
        if purpose != "batch":
            raise InvalidRequest(f"purpose must be batch (the files lorag keeps are batch "
                                 f"input), got {purpose!r}", field="purpose")
        return self._put_file(caller.tenant, filename or "upload.jsonl", purpose, content)

    def _put_file(self, tenant: str, filename: str, purpose: str, content: bytes) -> dict:
        file = {"id": f"file-{uuid.uuid4().hex}", "purpose": purpose, "filename": filename,
                "bytes": len(content), "created_at": int(time.time())}
        self.store.put_file(tenant, file, content)
        return self.store.file(tenant, file["id"])

    def file(self, caller: Caller, file_id: str) -> dict:
        file = self.store.file(caller.tenant, file_id)
        if file is None:
            raise NotFound(f"no file {file_id!r} (or it is another key's)", field="file_id")
        return file

    def content(self, caller: Caller, file_id: str) -> bytes:
        self.file(caller, file_id)
        return self.store.content(caller.tenant, file_id)

    # ---- batches ----

    def create(self, caller: Caller, body: BatchBody) -> dict:
        """A batch of the input file's lines: in progress, or failed naming its bad lines."""
        if self.file(caller, body.input_file_id)["purpose"] != "batch":  # 404: another's
            raise InvalidRequest(f"file {body.input_file_id!r} is not a batch input "
                                 "(purpose batch)", field="input_file_id")
        content = self.store.content(caller.tenant, body.input_file_id)
        lines, errors = read_lines(content, body.endpoint)
        now = int(time.time())
        batch = {"id": f"batch_{uuid.uuid4().hex}", "object": "batch",
                 "endpoint": body.endpoint, "errors": None,
                 "input_file_id": body.input_file_id, "completion_window": "24h",
                 "status": "in_progress", "output_file_id": None, "error_file_id": None,
                 "created_at": now, "in_progress_at": now, "expires_at": now + WINDOW_S,
                 "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "metadata": body.metadata or {}}
        if errors:
            batch |= {"status": "failed", "failed_at": now, "in_progress_at": None,
                      "errors": {"object": "list", "data": errors[:MAX_ERRORS]}}
            lines = []
        self.store.create(caller.tenant, batch, lines)
        return self.get(caller, batch["id"])

    def get(self, caller: Caller, batch_id: str) -> dict:
        batch = self.store.batch(caller.tenant, batch_id)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r} (or it is another key's)",
                           field="batch_id")
        return batch

    def cancel(self, caller: Caller, batch_id: str) -> dict:
        """Stop taking the batch's lines; it is cancelled once the running ones stopped
        (the runners notice within a lease renewal), with the lines that finished."""
        batch = self.get(caller, batch_id)
        if self.store.move(batch_id, "cancelling", ("in_progress",)) is None \
                and batch["status"] not in ("cancelling", "cancelled"):
            raise InvalidRequest(f"batch {batch_id!r} is {batch['status']}: only a batch in "
                                 "progress can be cancelled", field="batch_id")
        self.finish_if_done(batch_id)
        return self.get(caller, batch_id)

    def finish_if_done(self, batch_id: str, stale_before: float | None = None) -> None:
        """Write the output and error files and close the batch, once none of its lines
        runs (and, unless it is being cancelled, none waits); one replica does it. With
        `stale_before`, also a batch left finalizing before then (its replica died)."""
        status = self.store.statuses({batch_id}).get(batch_id)
        if status == "finalizing":
            batch = None if stale_before is None else self.store.move(
                batch_id, "finalizing", ("finalizing",), stale_before=stale_before)
            if batch is None:
                return  # its replica is finishing it
            cancelling = batch["cancelling_at"] is not None
        elif status in ("in_progress", "cancelling"):
            cancelling = status == "cancelling"
            if self.store.unfinished(batch_id, pending=not cancelling) or \
                    self.store.move(batch_id, "finalizing", (status,)) is None:
                return  # lines left, or another replica is finishing it
        else:
            return
        self._write_results(batch_id, cancelling)

    def _write_results(self, batch_id: str, cancelling: bool) -> None:
        """The output file (lines answered 200) and the error file (the others), in line
        order, then the batch completed (or cancelled)."""
        output, failed = [], []
        for line, custom_id, result, ok in self.store.results(batch_id):
            body = result["body"]
            (output if ok else failed).append(json.dumps({
                "id": f"batch_req_{batch_id.removeprefix('batch_')}_{line}",
                "custom_id": custom_id,
                "response": {"status_code": result["status_code"],
                             "request_id": body.get("id") if ok else None, "body": body},
                "error": None}))
        tenant, files = self.store.tenant_of(batch_id), {}
        for key, rows, suffix in (("output_file_id", output, "output"),
                                  ("error_file_id", failed, "error")):
            if rows:
                content = ("\n".join(rows) + "\n").encode()
                files[key] = self._put_file(tenant, f"{batch_id}_{suffix}.jsonl",
                                            "batch_output", content)["id"]
        self.store.move(batch_id, "cancelled" if cancelling else "completed",
                        ("finalizing",), **files)

    def finish_stalled(self, lease_s: float) -> None:
        """Finish what no replica will: batches whose last line's replica died before it
        finished them, or died finishing them (more than a lease ago)."""
        for batch_id in self.store.open_batches():
            self.finish_if_done(batch_id, stale_before=time.time() - lease_s)


def read_lines(content: bytes, endpoint: str) -> tuple[list[tuple[str, dict]], list[dict]]:
    """The file's requests [(custom_id, {"url", "body"})] and, for each bad line, an
    error {"code", "message", "param", "line"} (lines count from 1)."""
    lines, errors, seen = [], [], set()
    model = ENDPOINTS[endpoint]

    def bad(number: int, message: str, param: str | None = None) -> None:
        errors.append({"code": "invalid_request", "message": message, "param": param,
                       "line": number})

    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [{"code": "invalid_file", "message": f"the file is not UTF-8 text: {e}",
                     "param": None, "line": None}]
    rows = [(number, raw) for number, raw in enumerate(text.splitlines(), 1) if raw.strip()]
    if not rows:
        return [], [{"code": "empty_file", "message": "the file holds no requests",
                     "param": None, "line": None}]
    if len(rows) > MAX_LINES:
        return [], [{"code": "too_many_requests", "message": f"the file holds {len(rows)} "
                     f"requests; a batch takes at most {MAX_LINES}", "param": None,
                     "line": None}]
    for number, raw in rows:
        try:
            line = _Line.model_validate_json(raw)
            request = model.model_validate(line.body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            bad(number, f"{where}: {first['msg']}", where)
            continue
        except LoragError as e:  # check_texts: a NUL, a lone surrogate
            bad(number, e.message, e.field)
            continue
        if line.url != endpoint:
            bad(number, f"url is {line.url!r}, but this batch's endpoint is {endpoint!r}",
                "url")
        elif getattr(request, "stream", False):
            bad(number, "a batch's requests cannot stream: leave stream out", "body.stream")
        elif line.custom_id in seen:
            bad(number, f"custom_id {line.custom_id!r} is on an earlier line too: each "
                "request needs its own", "custom_id")
        else:
            seen.add(line.custom_id)
            lines.append((line.custom_id, {"url": line.url, "body": line.body}))
    return lines, errors


class BatchRunner:
    """This replica's share of every tenant's batches: a thread with an event loop that
    claims up to `concurrency` lines at a time, runs them, renews their leases, records
    their results and finishes the batches whose last line it ran."""

    def __init__(self, service: Service, concurrency: int = CONCURRENCY,
                 lease_s: float = LEASE_S, poll_s: float = 0.5):
        self.service, self.batches = service, Batches(service)
        self.store = self.batches.store
        self.concurrency, self.lease_s, self.poll_s = concurrency, lease_s, poll_s
        self.owner = f"replica-{uuid.uuid4().hex[:12]}"  # this process, in the lines' rows
        self.running: dict[tuple[str, int], asyncio.Task] = {}
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> "BatchRunner":
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                       name="lorag-batches", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop claiming, cancel the lines running here and give them back (pending)."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    async def _main(self) -> None:
        renewed = time.monotonic()
        try:
            while not self.stopping.is_set():
                free = self.concurrency - len(self.running)
                claimed = []
                if free > 0 and not self.service.draining:
                    claimed = await asyncio.to_thread(self.store.claim, self.owner, free,
                                                      self.lease_s)
                for line in claimed:
                    key = (line.batch_id, line.line)
                    self.running[key] = asyncio.create_task(self._run(line))
                if time.monotonic() - renewed > self.lease_s / 3:
                    await asyncio.to_thread(self._renew)
                    await asyncio.to_thread(self.batches.finish_stalled, self.lease_s)
                    renewed = time.monotonic()
                await asyncio.sleep(0.01 if claimed else self.poll_s)
        except Exception:  # the database is away: lines wait for their leases to run out
            log.exception("the batch runner stopped")
        finally:
            tasks = list(self.running.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.store.release(self.owner, list(self.running))

    def _renew(self) -> None:
        """Hold the running lines a lease longer; stop those of cancelled batches."""
        keys = list(self.running)
        if not keys:
            return
        self.store.renew(self.owner, keys, self.lease_s)
        statuses = self.store.statuses({batch_id for batch_id, _ in keys})
        for key in keys:
            if statuses.get(key[0]) != "in_progress":
                self.running[key].cancel()

    async def _run(self, claimed: Claimed) -> None:
        key = (claimed.batch_id, claimed.line)
        try:
            result = await self._answer(claimed)
            if result is None:  # the engine's queue is full: the line waits for later
                await asyncio.to_thread(self.store.release, self.owner, [key])
                await asyncio.sleep(1.0)
                return
            await asyncio.to_thread(self.store.finish, self.owner, *key, result)
            await asyncio.to_thread(self.batches.finish_if_done, claimed.batch_id)
        except asyncio.CancelledError:  # stopping, or the batch was cancelled
            await asyncio.to_thread(self.store.release, self.owner, [key])
            await asyncio.to_thread(self.batches.finish_if_done, claimed.batch_id)
        finally:
            self.running.pop(key, None)

    async def _answer(self, claimed: Claimed) -> dict | None:
        """The line's response body and status, as its route would answer; None when
        the engine is full."""
        caller = Caller(claimed.tenant, admin=False, key_id=f"batch:{claimed.batch_id}",
                        max_streams=self.concurrency)
        url, body = claimed.request["url"], claimed.request["body"]
        try:
            request = ENDPOINTS[url].model_validate(body)
            if url == "/v1/embeddings":
                embedded = await asyncio.to_thread(self.service.embeddings.embed,
                                                   request.to_request())
                return {"status_code": 200, "body": embedded.response()}
            chat = url == "/v1/chat/completions"
            call = self.service.chat if chat else self.service.complete
            reply = await asyncio.to_thread(
                call, caller, replace(request.to_request(), priority=BATCH_PRIORITY))
            return {"status_code": 200,
                    "body": await collected(reply, request.model, chat, None, self.service)}
        except Overloaded:
            return None
        except LoragError as e:
            m = mapping(e)
            return {"status_code": m.http_status,
                    "body": openai_error(e.message, m.openai_type, m.http_status, e.field)}
        except Exception as e:  # a bug: the line fails alone, its id in the log
            log.exception("batch %s line %d failed", claimed.batch_id, claimed.line)
            return {"status_code": 500,
                    "body": openai_error(public_message(e), "internal_error", 500)}
