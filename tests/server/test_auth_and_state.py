"""API keys, and tenants and adapter records in the state database (both backends),
without a model."""

import json
from pathlib import Path

import pytest
from sqlalchemy import exc, text

from lorag.errors import InvalidRequest, Overloaded, Unauthenticated
from lorag.server.auth import ApiKeys, hash_key
from lorag.server.quotas import KeyQuotas
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
    ({"sha256:abc": {"tenant": "a"}}, "a hashed key is 'sha256:' and 64 hex digits"),
    ({"k" * 20: {"tenant": "a", "max_streams": 0}}, "'max_streams' must be an integer >= 1"),
    ({"k" * 20: {"tenant": "a", "tokens_per_s": True}}, "'tokens_per_s' must be a number"),
    ({"k" * 20: {"tenant": "a", "adapter_roots": "/srv"}}, "'adapter_roots' must be a list"),
    ({"k" * 20: {"tenant": "a", "admn": True}}, "unknown field 'admn'; accepted: tenant"),
])
def test_bad_key_files_say_what_is_wrong(tmp_path, data, problem):
    with pytest.raises(InvalidRequest, match=problem) as error:
        keys_file(tmp_path, data)
    assert error.value.field == "api_keys"


def test_a_hashed_key_authenticates_like_the_key_and_carries_its_share(tmp_path):
    keys = keys_file(tmp_path, {hash_key("h" * 20): {
        "tenant": "acme", "admin": True, "adapter_roots": ["/srv/acme"], "max_streams": 3,
        "tokens_per_s": 2.5}})
    caller = keys.caller(f"Bearer {'h' * 20}")
    assert caller == Caller("acme", admin=True) and caller.adapter_roots == (Path("/srv/acme"),)
    assert (caller.max_streams, caller.tokens_per_s) == (3, 2.5)
    assert caller.key_id == hash_key("h" * 20)[7:19]  # a digest's prefix, never the key
    with pytest.raises(Unauthenticated, match="unknown API key"):
        keys.caller(f"Bearer {hash_key('h' * 20)}")  # the hash is not a key


def test_the_keys_file_is_read_again_when_it_changes(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("lorag.server.auth.CHECK_EVERY_S", 0)
    keys = keys_file(tmp_path, {"k" * 20: {"tenant": "acme"}})
    reloaded = []
    keys.on_reload.append(lambda: reloaded.append(True))
    (tmp_path / "keys.json").write_text(json.dumps({"n" * 20: {"tenant": "beta"},
                                                    "more": "bytes, so the size changes"}))
    with pytest.raises(Unauthenticated):  # a bad file (a short key) is not taken...
        keys.caller(f"Bearer {'n' * 20}")
    assert keys.caller(f"Bearer {'k' * 20}") == Caller("acme", admin=False)  # ...old keys stay
    assert "the API keys file changed but was not taken" in caplog.text and not reloaded
    (tmp_path / "keys.json").write_text(json.dumps({"n" * 20: {"tenant": "beta"}}))
    assert keys.caller(f"Bearer {'n' * 20}") == Caller("beta", admin=False)
    with pytest.raises(Unauthenticated):
        keys.caller(f"Bearer {'k' * 20}")
    assert reloaded == [True]


def test_key_quotas_count_streams_and_tokens_per_key(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("lorag.server.quotas.time.monotonic", lambda: now[0])
    quotas = KeyQuotas(max_streams=2, tokens_per_s=0)
    a, b = Caller("t", False, key_id="a"), Caller("t", False, key_id="b", max_streams=1)
    quotas.admit(a)
    quotas.admit(a)
    quotas.admit(b)
    for caller in (a, b):
        with pytest.raises(Overloaded, match="requests in flight") as refused:
            quotas.admit(caller)
        assert refused.value.retry_after == 1
    quotas.release(a, tokens=500)  # no rate: tokens are not counted
    quotas.admit(a)
    slow = Caller("t", False, key_id="slow", tokens_per_s=2)  # a bucket of 20 tokens
    quotas.admit(slow)
    quotas.release(slow, tokens=26)  # 6 tokens in debt
    with pytest.raises(Overloaded, match="used its 2 tokens per second") as refused:
        quotas.admit(slow)
    assert refused.value.retry_after == 3
    now[0] += 3
    quotas.admit(slow)  # paid back
    for _ in range(5):  # a daemon without keys: one user, the whole engine
        quotas.admit(Caller("default", True))


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
