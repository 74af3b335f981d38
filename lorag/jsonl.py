"""Reading JSONL files whose every mistake is reported as `file:line: what`."""

import json
from collections.abc import Iterator
from pathlib import Path

from lorag.errors import InvalidRequest


def read_objects(path: Path, field: str) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line. InvalidRequest (naming `field`, the
    option the file came from) for an unreadable file, a line that is not JSON or not an
    object."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"cannot read {path}: {e}", field=field) from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"{where}: not valid JSON ({e.msg} at column {e.colno})",
                                 field=field) from e
        if not isinstance(row, dict):
            raise InvalidRequest(f"{where}: each line must be a JSON object", field=field)
        yield where, row
