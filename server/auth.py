"""API keys -> callers. Keys come from a JSON file given at start (`--api-keys FILE`):

    {"<key>": {"tenant": "<name>", "admin": false}, ...}

A key may be written as its SHA-256 instead, `"sha256:<hex>"` (`lorag keys hash` prints
it), so the file holds no usable secret; an API key is a long random token, for which one
SHA-256 is what GitHub and Stripe store too (no salt or slow hash needed: there is nothing
to guess). Plain keys work too. Every comparison is digest against digest, in constant
time. An entry may also carry, for that key alone:

- "adapter_roots": ["/srv/adapters/acme"], the only folders it may register adapters
  from (inside the daemon's own roots), so one tenant's admin cannot register another's
  private folder;
- "max_streams": requests in flight at once, "tokens_per_s": tokens (prompt and output)
  per second, its fair share (server/quotas.py), instead of the daemon's defaults.

The file is read again when it changes (checked at most once a second) or on SIGHUP; a
file that no longer reads keeps the keys in force and logs why. Without a file the daemon
runs open: every caller is the admin of the tenant "default" (fit for loopback only; the
daemon says so when it starts).
"""

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lorag.errors import InvalidRequest, LoragError, Unauthenticated
from lorag.server.tenancy import Caller, check_tenant

OPEN_TENANT = "default"
HASHED = "sha256:"
MIN_KEY_LENGTH = 16
CHECK_EVERY_S = 1.0  # how often the file's change time is looked at
log = logging.getLogger("lorag.auth")


def hash_key(key: str) -> str:
    """What the keys file may hold instead of `key`."""
    return HASHED + hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The configured keys; `caller(header)` authenticates one request."""

    def __init__(self, keys: dict[bytes, Caller] | None = None, path: Path | None = None):
        self.keys = keys or {}  # sha256 digest of the key -> its caller
        self.path = path
        self.stamp = _stamp(path) if path else None
        self.checked = time.monotonic()
        self.lock = threading.Lock()
        self.on_reload: list[Callable[[], None]] = []  # called after new keys took effect

    @property
    def open(self) -> bool:
        """True when no key is configured: every request is let in."""
        return not self.keys

    @classmethod
    def from_file(cls, path: Path) -> "ApiKeys":
        """Read and check the key file; every mistake names the key entry and field."""
        return cls(_read(Path(path)), Path(path))

    def reload(self) -> bool:
        """Read the file again; on a mistake keep the keys in force and log it. Says
        whether the new keys took effect."""
        if self.path is None:
            return False
        with self.lock:
            self.stamp, self.checked = _stamp(self.path), time.monotonic()
            try:
                self.keys = _read(self.path)
            except LoragError as e:
                log.error("the API keys file changed but was not taken (the keys before it "
                          "stay in force): %s", e.message)
                return False
        log.info("API keys read again from %s: %d keys", self.path, len(self.keys))
        for hook in self.on_reload:
            hook()
        return True

    def caller(self, authorization: str | None) -> Caller:
        """Authenticate an `Authorization: Bearer <key>` value (HTTP header or gRPC
        metadata). Raises Unauthenticated when keys are configured and this one is not."""
        self._reload_if_changed()
        if self.open:
            return Caller(OPEN_TENANT, admin=True)
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'",
                                  field="authorization")
        digest = hashlib.sha256(key.strip().encode()).digest()
        found = None
        for known, caller in self.keys.items():  # every key compared, in constant time
            if hmac.compare_digest(known, digest):
                found = caller
        if found is None:
            raise Unauthenticated("unknown API key", field="authorization")
        return found

    def _reload_if_changed(self) -> None:
        if self.path is None or time.monotonic() - self.checked < CHECK_EVERY_S:
            return
        self.checked = time.monotonic()
        if _stamp(self.path) != self.stamp:
            self.reload()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _read(path: Path) -> dict[bytes, Caller]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"cannot read API keys from {path}: {e}",
                             field="api_keys") from e
    if not isinstance(data, dict) or not data:
        raise InvalidRequest(f"{path} must hold a non-empty JSON object "
                             '{"<key>": {"tenant": "<name>", "admin": false}}',
                             field="api_keys")
    return dict(_entry(key, entry, f"{path}: entry {index + 1}")
                for index, (key, entry) in enumerate(data.items()))


def _entry(key: str, entry: object, where: str) -> tuple[bytes, Caller]:
    """(digest, caller) of one entry of the keys file."""
    if key.startswith(HASHED):
        try:
            digest = bytes.fromhex(key.removeprefix(HASHED))
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise InvalidRequest(f"{where}: a hashed key is 'sha256:' and 64 hex digits "
                                 "(lorag keys hash prints one)", field="api_keys")
    elif len(key) < MIN_KEY_LENGTH:
        raise InvalidRequest(f"{where}: keys must be at least {MIN_KEY_LENGTH} characters",
                             field="api_keys")
    else:
        digest = hashlib.sha256(key.encode()).digest()
    check_tenant(entry.get("tenant") if isinstance(entry, dict) else None, where)
    unknown = set(entry) - {"tenant", "admin", "adapter_roots", "max_streams", "tokens_per_s"}
    checks = [
        (not unknown, f"unknown field {sorted(unknown)[0] if unknown else ''!r}; accepted: "
                      "tenant, admin, adapter_roots, max_streams, tokens_per_s"),
        (isinstance(entry.get("admin", False), bool), "'admin' must be true or false"),
        (_is_list_of_text(entry.get("adapter_roots", [])),
         "'adapter_roots' must be a list of folders"),
        (_positive(entry.get("max_streams", 1), int), "'max_streams' must be an integer >= 1"),
        (_positive(entry.get("tokens_per_s", 1), int | float),
         "'tokens_per_s' must be a number > 0"),
    ]
    for ok, problem in checks:
        if not ok:
            raise InvalidRequest(f"{where}: {problem}", field="api_keys")
    roots = entry.get("adapter_roots")
    return digest, Caller(
        entry["tenant"], entry.get("admin", False), key_id=digest.hex()[:12],
        adapter_roots=None if roots is None else tuple(Path(r).expanduser() for r in roots),
        max_streams=entry.get("max_streams"), tokens_per_s=entry.get("tokens_per_s"))


def _is_list_of_text(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) and item for item in value)


def _positive(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool) and value > 0
