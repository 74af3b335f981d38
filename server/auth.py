"""API keys -> callers. Keys come from a JSON file given at start (`--api-keys FILE`):

    {"<key>": {"tenant": "<name>", "admin": false}, ...}

Without a file the daemon runs open: every caller is the admin of the tenant "default"
(fit for loopback only; the daemon says so when it starts).
"""

import hmac
import json
from pathlib import Path

from lorag.errors import InvalidRequest, Unauthenticated
from lorag.server.tenancy import Caller, check_tenant

OPEN_TENANT = "default"


class ApiKeys:
    """The configured keys; `caller(header)` authenticates one request."""

    def __init__(self, keys: dict[str, Caller] | None = None):
        self.keys = keys or {}

    @property
    def open(self) -> bool:
        """True when no key is configured: every request is let in."""
        return not self.keys

    @classmethod
    def from_file(cls, path: Path) -> "ApiKeys":
        """Read and check the key file; every mistake names the key entry and field."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise InvalidRequest(f"cannot read API keys from {path}: {e}",
                                 field="api_keys") from e
        if not isinstance(data, dict) or not data:
            raise InvalidRequest(f"{path} must hold a non-empty JSON object "
                                 '{"<key>": {"tenant": "<name>", "admin": false}}',
                                 field="api_keys")
        keys = {}
        for index, (key, entry) in enumerate(data.items()):
            where = f"{path}: entry {index + 1}"
            if len(key) < 16:
                raise InvalidRequest(f"{where}: keys must be at least 16 characters",
                                     field="api_keys")
            check_tenant(entry.get("tenant") if isinstance(entry, dict) else None, where)
            if not isinstance(entry.get("admin", False), bool):
                raise InvalidRequest(f"{where}: 'admin' must be true or false",
                                     field="api_keys")
            keys[key] = Caller(entry["tenant"], entry.get("admin", False))
        return cls(keys)

    def caller(self, authorization: str | None) -> Caller:
        """Authenticate an `Authorization: Bearer <key>` value (HTTP header or gRPC
        metadata). Raises Unauthenticated when keys are configured and this one is not."""
        if self.open:
            return Caller(OPEN_TENANT, admin=True)
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'",
                                  field="authorization")
        for known, caller in self.keys.items():  # constant-time compare of every key
            if hmac.compare_digest(known.encode(), key.strip().encode()):
                return caller
        raise Unauthenticated("unknown API key", field="authorization")
