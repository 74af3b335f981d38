"""The small set of errors every lorag component raises.

Transports map these in one place each (HTTP status codes, gRPC status codes); anything
else that goes wrong is infrastructure and surfaces as `RuntimeError(...) from e`.
"""


class LoragError(Exception):
    """Base class: a problem the caller can act on, with a message that says how.

    `field` names the input that was wrong (for example `model` or `max_tokens`), so a
    transport can point at it; it is None when no single field is to blame.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(LoragError):
    """The input is malformed or names something that cannot be used as given."""


class TooLarge(InvalidRequest):
    """The request brings more than a configured limit allows (the message says which
    limit, and what it allows)."""


class NotFound(LoragError):
    """Nothing of that name is visible to the caller (another tenant's things included)."""


class AdapterNotFound(NotFound):
    """No adapter of that name is visible to the caller."""

    @classmethod
    def named(cls, name: object, field: str | None = None) -> "AdapterNotFound":
        """The one message for an adapter nobody has loaded under `name`."""
        return cls(f"adapter {name!r} is not loaded", field=field)


class AdapterChanged(LoragError):
    """A registered adapter's files no longer hold the weights it was registered with
    (rewritten or deleted since): an admin registers it again, or unloads it."""


class Overloaded(LoragError):
    """The daemon is at capacity (bounded queue full), or the caller's key at its share;
    retrying after `retry_after` seconds may succeed."""

    def __init__(self, message: str, *, field: str | None = None, retry_after: int = 1):
        super().__init__(message, field=field)
        self.retry_after = retry_after


class PermissionDenied(LoragError):
    """The caller's credentials do not allow this operation."""


class Unauthenticated(LoragError):
    """No API key, or one the daemon does not know, where keys are required."""


class Unavailable(LoragError):
    """Something the request needs (the state database) cannot be reached now; the daemon
    reconnects by itself, and retrying later may succeed."""


class RequestFailed(LoragError):
    """The engine could not compute one request (a bug, not the caller's input): that
    request alone ends, with a message of lorag's own that says so; the log has the
    cause. Answered as an internal error (500 / INTERNAL)."""

    @classmethod
    def alone(cls, what: str) -> "RequestFailed":
        """The error for one request that `what` (naming the request) ended, saying that
        no other request was touched."""
        return cls(f"{what}. Other requests were not affected; the daemon's log has the "
                   "details")
