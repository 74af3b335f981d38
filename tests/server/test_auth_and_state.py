"""API keys, and tenants and adapter records in the state database (both backends),
without a model."""

import json

import pytest
from sqlalchemy import exc, text

from lorag.errors import InvalidRequest, Unauthenticated
from lorag.server.auth import ApiKeys
from lorag.server.state import AdapterRecord, StateStore
from lorag.server.tenancy import Caller
from lorag.state import Database


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


def test_adapter_records_survive_reopening(state):
    store = StateStore(Database(state))
    store.put_adapter(AdapterRecord("acme", "style", "/a/style", shared=False))
    store.put_adapter(AdapterRecord("beta", "house", "/a/house", shared=True))
    store.put_adapter(AdapterRecord("acme", "style", "/a/style-v2", False, "v2"))  # replace
    store.db.close()
    again = StateStore(Database(state))
    assert again.adapters() == [AdapterRecord("acme", "style", "/a/style-v2", False, "v2"),
                                AdapterRecord("beta", "house", "/a/house", True)]
    assert again.tenants() == ["acme", "beta"]
    # the tenancy rule: one's own first, then a shared one; another's private never
    assert again.visible_adapter("acme", "style").path == "/a/style-v2"
    assert again.visible_adapter("acme", "house").tenant == "beta"
    assert again.visible_adapter("beta", "style") is None
    assert again.delete_adapter("acme", "style") is True
    assert again.delete_adapter("acme", "style") is False
    assert [r.key for r in again.adapters()] == ["beta.house"]
    again.db.close()


FAILING_INSERT = {
    "sqlite": ["CREATE TRIGGER fail BEFORE INSERT ON adapters "
               "BEGIN SELECT RAISE(ABORT, 'disk full'); END"],
    "postgresql": ["CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS "
                   "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$",
                   "CREATE TRIGGER fail BEFORE INSERT ON adapters FOR EACH ROW "
                   "EXECUTE FUNCTION fail()"],
}


def test_a_failed_write_leaves_no_partial_record(state):
    store = StateStore(Database(state))
    with store.db.write() as connection:
        for statement in FAILING_INSERT[store.db.dialect]:
            connection.execute(text(statement))
    with pytest.raises(exc.DBAPIError, match="disk full"):
        store.put_adapter(AdapterRecord("newco", "style", "/a/style", shared=False))
    assert store.adapters() == [] and store.tenants() == []  # the tenant row rolled back too
    store.db.close()
