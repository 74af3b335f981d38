"""Versions and weighted rollouts across a fleet: two replicas on one PostgreSQL, 50 API
keys of one tenant. `support@v1` and `support@v2` are registered (two adapters whose
greedy answers differ); `support` rolled out 80/20 through replica A splits 500 requests,
sent to both replicas, within 5 points of 80/20, every key always on the same version;
a promotion to v2 through A is what B serves on its next request; refusals name the
field."""

import json
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.daemons import ALICE, KEYS, LocalDaemon
from tests.server.conftest import adapters_for
from tests.server.test_http import chat, load, post
from tests.tiny import tiny_model

USERS = [f"Bearer rollout-user-key-{i:04d}" for i in range(50)]


@pytest.fixture(scope="module")
def fleet(postgres, tiny_base, tmp_path_factory):
    keys = tmp_path_factory.mktemp("rollout-keys") / "keys.json"
    keys.write_text(json.dumps({**KEYS, **{user.split()[1]: {"tenant": "alice",
                                                             "admin": False}
                                           for user in USERS}}))
    state = postgres.new_database()
    root = adapters_for(tiny_model(), tmp_path_factory.mktemp("rollout-adapters"), scale=0.3)
    replicas = [LocalDaemon(tiny_base, tmp_path_factory.mktemp(f"rollout-{name}"), root,
                            keys, state=state) for name in "ab"]
    a, _ = replicas
    for version, folder in (("v1", "style"), ("v2", "other")):
        loaded = load(a, f"support@{version}", root / folder)
        assert loaded.status_code == 200, loaded.text
    yield replicas
    for replica in replicas:
        replica.stop()


def rollout(replica, versions: dict) -> httpx.Response:
    return post(replica, "/v1/adapters/support/rollout", {"versions": versions})


@pytest.mark.slow
def test_a_rollout_splits_by_weight_sticks_per_key_and_promotes_everywhere(fleet):
    a, b = fleet
    answers = {chat(a, f"support@{v}"): v for v in ("v1", "v2")}
    assert len(answers) == 2, "the two versions must answer differently"
    assert rollout(a, {"v1": 80, "v2": 20}).status_code == 200
    seen = defaultdict(set)

    def ask(i: int) -> None:
        user = USERS[i % 50]
        seen[user].add(answers[chat(fleet[i % 2], "support", key=user)])

    with ThreadPoolExecutor(8) as pool:  # as clients would: a few at once on each replica
        list(pool.map(ask, range(500)))
    assert all(len(versions) == 1 for versions in seen.values()), seen  # sticky per key
    share = Counter(next(iter(v)) for v in seen.values())["v1"] / 50
    assert 0.75 <= share <= 0.85, share  # 80/20 within 5 points

    assert rollout(a, {"v2": 100}).status_code == 200  # promoted through A ...
    assert {answers[chat(b, "support", key=user)] for user in USERS} == {"v2"}  # ... B
    got = httpx.get(f"{b.url}/v1/adapters/support/rollout", timeout=30,
                    headers={"Authorization": ALICE}).json()
    assert got == {"name": "support", "versions": {"v2": 100}}


@pytest.mark.parametrize(("versions", "status", "message"), [
    ({"v9": 10}, 404, "support@v9 is not one of your adapters"),
    ({"v1": -1}, 400, "a weight is an integer >= 0"),
    ({"v1": 0}, 400, "at least one weight must be above 0"),
    ({}, 400, "versions"),
])
def test_bad_rollouts_are_refused_naming_the_field(fleet, versions, status, message):
    response = rollout(fleet[0], versions)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    user = post(fleet[0], "/v1/adapters/support/rollout", {"versions": {"v1": 1}},
                key=USERS[0])
    assert user.status_code == 403


@pytest.mark.slow
def test_the_cli_rolls_out_and_refuses_a_bad_weight(fleet):
    from typer.testing import CliRunner

    from lorag.cli import app

    a, b = fleet
    env = {"LORAG_API_KEY": ALICE.split()[1]}
    done = CliRunner().invoke(app, ["adapters", "rollout", "support", "v1=50", "v2=50",
                                    "--url", a.url], env=env)
    assert done.exit_code == 0, done.output
    got = httpx.get(f"{b.url}/v1/adapters/support/rollout", timeout=30,
                    headers={"Authorization": ALICE}).json()
    assert got["versions"] == {"v1": 50, "v2": 50}
    bad = CliRunner().invoke(app, ["adapters", "rollout", "support", "v1=half",
                                   "--url", a.url], env=env)
    assert bad.exit_code != 0 and "VERSION=WEIGHT" in bad.output
