"""API keys and the SQLite state store, without a model."""

import json
import sqlite3

import pytest

from lorag.errors import InvalidRequest, Unauthenticated
from lorag.server.auth import ApiKeys
from lorag.server.state import AdapterRecord, StateStore
from lorag.server.tenancy import Caller


def keys_file(tmp_path, data) -> ApiKeys:
    path = tmp_path / "keys.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return ApiKeys.from_file(path)


def test_keys_authenticate_bearer_tokens(tmp_path):
    keys = keys_file(tmp_path, {"k" * 20: {"tenant": "acme", "admin": True},
                                "u" * 20: {"tenant": "acme"}})
    assert keys.caller(f"Bearer {'k' * 20}") == Caller("acme", admin=True)
    assert keys.caller(f"bearer {'u' * 20}") == Caller("acme", admin=False)
    with pytest.raises(Unauthenticated, match="missing API key"):
        keys.caller(None)
    with pytest.raises(Unauthenticated, match="missing API key"):
        keys.caller("k" * 20)  # no scheme
    with pytest.raises(Unauthenticated, match="unknown API key"):
        keys.caller("Bearer " + "x" * 20)


def test_without_keys_every_caller_is_the_default_admin():
    assert ApiKeys().open and ApiKeys().caller(None) == Caller("default", admin=True)


@pytest.mark.parametrize("data, problem", [
    ("{not json", "cannot read API keys"),
    ([], "non-empty JSON object"),
    ({}, "non-empty JSON object"),
    ({"short": {"tenant": "a"}}, "at least 16 characters"),
    ({"k" * 20: {"tenant": "Bad Name"}}, "'tenant' must be"),
    ({"k" * 20: {"tenant": "a", "admin": "yes"}}, "'admin' must be true or false"),
    ({"k" * 20: "acme"}, "'tenant' must be"),
])
def test_bad_key_files_say_what_is_wrong(tmp_path, data, problem):
    with pytest.raises(InvalidRequest, match=problem) as error:
        keys_file(tmp_path, data)
    assert error.value.field == "api_keys"


def test_adapter_records_survive_reopening(tmp_path):
    store = StateStore(tmp_path)
    store.put_adapter(AdapterRecord("acme", "style", "/a/style", shared=False))
    store.put_adapter(AdapterRecord("beta", "house", "/a/house", shared=True))
    store.put_adapter(AdapterRecord("acme", "style", "/a/style-v2", shared=False))  # replace
    store.close()
    again = StateStore(tmp_path)
    assert again.adapters() == [AdapterRecord("acme", "style", "/a/style-v2", False),
                                AdapterRecord("beta", "house", "/a/house", True)]
    assert again.tenants() == ["acme", "beta"]
    assert again.delete_adapter("acme", "style") is True
    assert again.delete_adapter("acme", "style") is False
    assert [r.key for r in again.adapters()] == ["beta.house"]


def test_a_failed_write_leaves_no_partial_record(tmp_path):
    store = StateStore(tmp_path)
    store.db.execute("CREATE TRIGGER fail BEFORE INSERT ON adapters "
                     "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.DatabaseError, match="disk full"):
        store.put_adapter(AdapterRecord("newco", "style", "/a/style", shared=False))
    assert store.adapters() == [] and store.tenants() == []  # the tenant row rolled back too
