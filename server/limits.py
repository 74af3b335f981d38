"""RequestLimits: how much one request may bring, in one place, each one configurable.

`lorag serve --limit NAME=VALUE` (repeatable) sets any of them; docs/isolation.md lists them. A
request past one gets TooLarge (413 / RESOURCE_EXHAUSTED) saying what was allowed and which
limit allows more. Both transports go through the service, which checks every request here
before anything of it runs; the engine keeps the checks of kind (types, ranges) its step
loop relies on.
"""

import json
from dataclasses import dataclass, fields, replace

from lorag.errors import InvalidRequest, TooLarge
from lorag.server.engine.structured import Constraint, depth


@dataclass(frozen=True)
class RequestLimits:
    """Each field a bound on one request (defaults in parentheses).

    messages: messages in one chat (1024).
    stop_strings / stop_chars: stop strings per request, characters per stop string (16,
        256): each one is looked for in the output after every token, on the shared step.
    schema_kb: a JSON schema's or grammar's text, in KiB (64): compile time grows with it.
    schema_depth: objects and arrays nested in a JSON schema (32).
    regex_chars: a regex's characters (4096).
    documents_per_request: documents in one ingest request (1000).
    document_chars: characters of one document (2,000,000): it is chunked and embedded
        while the request waits.
    upload_files / upload_file_mb: files in one upload, and MiB per file (32, 20).
    adapters_per_tenant: adapters one tenant may register (1024).
    header_kb: an HTTP request's line and headers, in KiB (16, uvicorn's default).
    embedding_inputs: texts in one embeddings request (2048, OpenAI's bound).
    rerank_documents: documents in one rerank request (256): each is one request on the
        engine's queue while the caller waits.
    """

    messages: int = 1024
    stop_strings: int = 16
    stop_chars: int = 256
    schema_kb: int = 64
    schema_depth: int = 32
    regex_chars: int = 4096
    documents_per_request: int = 1000
    document_chars: int = 2_000_000
    upload_files: int = 32
    upload_file_mb: int = 20
    adapters_per_tenant: int = 1024
    header_kb: int = 16
    embedding_inputs: int = 2048
    rerank_documents: int = 256

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"limit {item.name} must be an integer >= 1, got "
                                     f"{value!r}", field="limit")

    def with_settings(self, settings: list[str]) -> "RequestLimits":
        """These limits with `NAME=VALUE` settings applied (`lorag serve --limit`)."""
        known = {item.name for item in fields(self)}
        changes = {}
        for setting in settings:
            name, _, value = setting.partition("=")
            if name not in known or not value.strip().isdigit():
                raise InvalidRequest(f"--limit takes NAME=INTEGER with NAME one of "
                                     f"{', '.join(sorted(known))}; got {setting!r}",
                                     field="limit")
            changes[name] = int(value)
        return replace(self, **changes)

    # ---- checks ----

    def check_chat(self, messages: list, stop: list, constraint: Constraint | None) -> None:
        """A chat's messages, stop strings and constraint."""
        self._at_most(len(messages), "messages", "messages", "messages in a chat")
        self.check_sampling(stop, constraint)

    def check_sampling(self, stop: list, constraint: Constraint | None) -> None:
        """A request's stop strings and output constraint."""
        self._at_most(len(stop), "stop_strings", "stop", "stop strings")
        for i, text in enumerate(stop):
            self._at_most(len(text), "stop_chars", f"stop.{i}", "characters in a stop string")
        if constraint is None or constraint.kind == "json_object":
            return
        if constraint.kind == "regex":
            self._at_most(len(constraint.spec), "regex_chars", "response_format",
                          "characters in a regex")
            return
        self._at_most(len(constraint.spec), "schema_kb", "response_format",
                      f"KiB in a {constraint.kind}", scale=1024)
        if constraint.kind == "json_schema":
            self._at_most(depth(json.loads(constraint.spec)), "schema_depth",
                          "response_format", "levels of nesting in a json_schema")

    def check_tools(self, tools) -> None:
        """A chat's tools (server/tools.py ToolUse): each function's parameters schema is
        held to a json_schema's limits before anything compiles it."""
        for i, function in enumerate(tools.functions.values()):
            if "parameters" not in function:
                continue
            field, text = f"tools.{i}.function.parameters", json.dumps(function["parameters"])
            self._at_most(len(text), "schema_kb", field, "KiB in a json_schema", scale=1024)
            self._at_most(depth(function["parameters"]), "schema_depth", field,
                          "levels of nesting in a json_schema")

    def check_documents(self, documents: list[dict]) -> None:
        """One ingest request's documents ({"id", "text", ...})."""
        self._at_most(len(documents), "documents_per_request", "documents",
                      "documents in one request")
        for i, document in enumerate(documents):
            self._at_most(len(document.get("text") or ""), "document_chars",
                          f"documents.{i}.text", "characters in a document")

    def check_upload(self, files: int) -> None:
        """An upload's number of files (each file's size: `upload_file_bytes`)."""
        self._at_most(files, "upload_files", "files", "files in one upload")

    def check_embedding_inputs(self, inputs: int) -> None:
        """An embeddings request's number of texts."""
        self._at_most(inputs, "embedding_inputs", "input", "texts to embed")

    def check_rerank_documents(self, documents: int) -> None:
        """A rerank request's number of documents."""
        self._at_most(documents, "rerank_documents", "documents", "documents to rerank")

    @property
    def upload_file_bytes(self) -> int:
        return self.upload_file_mb << 20

    def check_adapters(self, tenant: str, registered: int) -> None:
        """Room for one more adapter of a tenant that has `registered`."""
        if registered >= self.adapters_per_tenant:
            raise TooLarge(f"tenant {tenant!r} has {registered} adapters, the most one tenant "
                           f"may register (the daemon's --limit adapters_per_tenant); unload "
                           "one first", field="name")

    def _at_most(self, value: int, limit: str, field: str, what: str, scale: int = 1) -> None:
        allowed = getattr(self, limit)
        if value > allowed * scale:
            got = f"{value / scale:.1f}" if scale > 1 else str(value)
            raise TooLarge(f"{field} has {got} {what}; at most {allowed} are taken (the "
                           f"daemon's --limit {limit})", field=field)
