"""A lorag daemon's HTTP error answers, turned back into lorag's errors on the client side
(`--url` commands, `lorag eval generate`, `lorag train --serve`)."""

import httpx

from lorag.errors import InvalidRequest, LoragError, NotFound, PermissionDenied, Unauthenticated

_KINDS: dict[int, type[LoragError]] = {401: Unauthenticated, 403: PermissionDenied,
                                       404: NotFound}


def daemon_error(response: httpx.Response, what: str) -> Exception:
    """The error a failed `response` means: the caller's mistake (4xx) as the matching
    LoragError with the daemon's message and field, anything else as a RuntimeError.
    `what` says what was asked, e.g. "the daemon at http://... refused the adapter"."""
    try:
        error = response.json()["error"]
        message, field = error["message"], error.get("param")
    except (ValueError, KeyError, TypeError):
        message, field = response.text, None
    text = f"{what} ({response.status_code}): {message}"
    if not 400 <= response.status_code < 500:
        return RuntimeError(text)
    return _KINDS.get(response.status_code, InvalidRequest)(text, field=field)
