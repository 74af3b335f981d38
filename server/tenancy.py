"""Who owns what: the one tenancy rule, for adapters and retrieval namespaces alike.

Tenant T's adapter or namespace N is known to the engine and the document store as the
key "T.N" (`key`): tenant names have no dots, so the first dot splits a key. A caller sees
its own things and the ones other tenants marked shared; a name resolves to the caller's
own thing first, then to a shared one (shared names are unique across tenants, so a name
means at most one shared thing). Another tenant's private thing is not found, with the
same message as a name nobody has: nothing tells that it exists. Only admin keys change
anything. Nothing below the service knows any of this: keys are opaque there.
"""

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorag.errors import InvalidRequest, PermissionDenied
from lorag.names import check_name

TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # no dots: a key's first dot ends it
TENANT_RULE = "1-63 characters of a-z, 0-9, _ and - starting with a letter or digit"


@dataclass(frozen=True)
class Caller:
    """Who is asking: their tenant, and whether they may change things; and what their key
    allows beyond that (not part of who they are: two keys of one tenant compare equal).

    key_id: a short digest of the key, safe to log and to count a key's share by; None
        on a daemon without keys (one user: no share to keep).
    adapter_roots: where this key may register adapters from (None: the daemon's roots).
    max_streams / tokens_per_s: the key's fair share (None: the daemon's default).
    """

    tenant: str
    admin: bool
    key_id: str | None = field(default=None, compare=False)
    adapter_roots: tuple[Path, ...] | None = field(default=None, compare=False)
    max_streams: int | None = field(default=None, compare=False)
    tokens_per_s: float | None = field(default=None, compare=False)


def key(tenant: str, name: str) -> str:
    """The key tenant `tenant`'s thing `name` is stored and served under."""
    return f"{tenant}.{name}"


def own_key(caller: Caller, name: str, *, action: str, what: str, field: str) -> str:
    """The key of the caller's own `what` named `name`, for `action` (for example "write
    documents"): admin keys only, and the name follows the one rule (lorag/names.py)."""
    require_admin(caller, action)
    return key(caller.tenant, check_name(name, field, what))


def split(stored: str) -> tuple[str | None, str]:
    """(tenant, name) of a key; tenant None for a key made outside any tenant."""
    tenant, dot, name = stored.partition(".")
    return (tenant, name) if dot else (None, stored)


def resolve(caller: Caller, name: str, own_exists: Callable[[str], bool],
            shared: Iterable[str]) -> str | None:
    """The key `name` means to `caller`: its own thing if `own_exists(key)`, else the
    shared key of that name among `shared`, else None (callers raise their NotFound)."""
    own = key(caller.tenant, name)
    if own_exists(own):
        return own
    return next((stored for stored in shared if split(stored)[1] == name), None)


def visible(caller: Caller, stored: str, shared: bool) -> bool:
    """Whether `caller` may see or use the thing under key `stored`."""
    return shared or split(stored)[0] == caller.tenant


def require_admin(caller: Caller, what: str) -> None:
    """PermissionDenied unless the caller's key is an admin key; `what` says the action."""
    if not caller.admin:
        raise PermissionDenied(f"this API key may not {what}; use an admin key",
                               field="authorization")


def check_shared_name(stored: str, shared: Iterable[str], what: str, field: str) -> None:
    """InvalidRequest if another tenant already shares a `what` of this key's name."""
    tenant, name = split(stored)
    for other in shared:
        other_tenant, other_name = split(other)
        if other_name == name and other != stored:
            raise InvalidRequest(f"a shared {what} named {name!r} already exists (tenant "
                                 f"{other_tenant!r}); choose another name", field=field)


def check_tenant(tenant: object, where: str) -> str:
    """A tenant name from the key file; InvalidRequest names `where` and the rule."""
    if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
        raise InvalidRequest(f"{where}: 'tenant' must be {TENANT_RULE}", field="api_keys")
    return tenant
