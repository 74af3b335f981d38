"""The one rule for names of things: adapters, retrieval namespaces and their stored keys.

Letters, digits and `. _ : -`, starting with a letter or digit: safe in a file name, a URL
path segment, a Prometheus label and a gRPC field, and free of `/` so it never climbs out
of a folder.
"""

import re

from lorag.errors import InvalidRequest

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
MAX_LENGTH = 128  # a name as a user gives it
MAX_KEY_LENGTH = 192  # a name as stored or served, with room for an owner's prefix


def check_name(value: object, field: str, what: str = "name",
               max_length: int = MAX_LENGTH) -> str:
    """`value` if it is a valid name, else InvalidRequest naming `field` and the rule."""
    if not isinstance(value, str) or len(value) > max_length or not _NAME.fullmatch(value):
        raise InvalidRequest(f"{what} {value!r} must be 1-{max_length} characters of "
                             "letters, digits and . _ : - starting with a letter or digit",
                             field=field)
    return value


def check_adapter_name(value: object, field: str, max_length: int = MAX_LENGTH) -> str:
    """An adapter's name (or its engine key, with `max_length` MAX_KEY_LENGTH): a name, or
    `name@version` (a version of it, for rollouts), each part by the one rule."""
    if isinstance(value, str) and value.count("@") == 1:
        base, version = value.split("@")
        check_name(base, field, "adapter name", max_length)
        check_name(version, field, "adapter version", max_length=32)
        return value
    return check_name(value, field, "adapter name", max_length)
