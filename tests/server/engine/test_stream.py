"""What of the text decoded so far a stream may send (`releasable`): everything before a
stop string, nothing that may still grow into one, no half of a character."""

import pytest

from lorag.server.engine.stream import releasable


@pytest.mark.parametrize(("full", "sent", "stops", "final", "expected"), [
    ("Hello wor", 0, [], False, ("Hello wor", 9, False)),
    ("Hello wor", 6, [], False, ("wor", 9, False)),  # only what was not sent yet
    ("Hello END there", 0, ["END"], False, ("Hello ", 6, True)),  # cut where it starts
    ("Hello EN", 0, ["END"], False, ("Hello ", 6, False)),  # "EN" may become "END"
    ("Hello EN", 0, ["END"], True, ("Hello EN", 8, False)),  # ... unless it is the end
    ("Hello E", 0, ["END", "Ex"], False, ("Hello ", 6, False)),
    ("caf\ufffd", 0, [], False, ("caf", 3, False)),  # a character still incomplete
    ("ab STOP", 5, ["STOP"], False, ("", 5, True)),  # sent past the start: nothing more
    ("a. b. c", 0, [". c", "."], False, ("a", 1, True)),  # the earliest stop wins
])
def test_releasable(full, sent, stops, final, expected):
    assert releasable(full, sent, stops, final) == expected
