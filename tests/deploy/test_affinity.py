"""Adapter affinity on this machine: three `lorag serve` replicas on one PostgreSQL behind
HAProxy (Debian's; installed if missing) running deploy/haproxy/haproxy.cfg, as compose
does. Mixed traffic over 12 adapters, read back from each replica's /metrics: each
adapter's requests are all served by one replica, and only that replica puts it into a
compute slot or reads it into RAM (but the replica that registered them all: loading
validates). Killing a replica moves its adapters, each to one survivor, and no other."""

import signal

import pytest

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.daemon import register_adapters
from lorag.benchmarks.fleet import (
    Fleet,
    Haproxy,
    plan,
    requests_by_adapter,
    resident,
    scrape,
)
from tests.system import program
from tests.tiny import tiny_model

ADAPTERS = [f"a{i}" for i in range(12)]
PER_ADAPTER = 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_base, postgres):
    program("haproxy", "haproxy")
    folder = tmp_path_factory.mktemp("fleet")
    root = folder / "adapters"
    paths = make_adapters(tiny_model(), root, {name: AdapterSpec(rank=8, alpha=16, scale=0.3)
                                               for name in ADAPTERS}, seed=7)
    # torch attention: vLLM's kernel costs each replica ~10 s of imports to start
    fleet = Fleet(folder, ["--model", str(tiny_base), "--quantize", "none", "--dtype",
                           "float32", "--attention-backend", "torch",
                           "--max-model-len", "512", "--adapter-root", str(root),
                           "--max-active-adapters", str(len(ADAPTERS)),
                           "--max-lora-rank", "16"], postgres.new_database())
    proxy = None
    try:
        register_adapters(fleet.urls[0], paths)  # once, on one replica: the others read the state
        proxy = Haproxy([url.removeprefix("http://") for url in fleet.urls], folder)
        yield fleet, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        fleet.stop()


def served(urls: list[str], before: list[dict] | None = None) -> list[dict[str, float]]:
    """Requests per adapter name on each replica (since `before`, when given)."""
    now = [{label.removeprefix("default."): count
            for label, count in requests_by_adapter(scrape(url)).items()} for url in urls]
    if before is None:
        return now
    return [{name: count - old.get(name, 0) for name, count in counts.items()
             if count - old.get(name, 0)} for counts, old in zip(now, before, strict=True)]


def owners(counts: list[dict[str, float]]) -> dict[str, int]:
    """Each adapter's one replica (index); fails if an adapter was served by several."""
    found = {}
    for name in ADAPTERS:
        where = [index for index, replica in enumerate(counts) if replica.get(name)]
        assert len(where) == 1, f"{name} was served by replicas {where}: {counts}"
        assert counts[where[0]][name] == PER_ADAPTER
        found[name] = where[0]
    return found


@pytest.mark.slow
def test_each_adapter_sticks_to_one_replica_and_moves_only_when_it_leaves(fleet):
    fleet, proxy = fleet
    proxy.send(plan(ADAPTERS, PER_ADAPTER, seed=1))
    first = served(fleet.urls)
    home = owners(first)
    print("requests per replica, per adapter:", first)
    for index, url in enumerate(fleet.urls):  # loaded on its home replica only
        metrics = scrape(url)
        mine = {f"default.{name}" for name, replica in home.items() if replica == index}
        assert resident(metrics, "active") == mine
        if index > 0:  # the first replica read every adapter to validate it at load
            assert resident(metrics, "ram") == mine

    victim = max(range(len(fleet.urls)), key=lambda i: list(home.values()).count(i))
    moved = {name for name, replica in home.items() if replica == victim}
    assert moved, home
    fleet.replicas[victim].process.send_signal(signal.SIGKILL)
    fleet.replicas[victim].process.wait()
    proxy.wait_for(lambda status: status[f"lorag-{victim + 1}"] == "DOWN",
                   "health check marking the killed replica DOWN")

    survivors = [url for i, url in enumerate(fleet.urls) if i != victim]
    before = [first[i] for i in range(len(fleet.urls)) if i != victim]
    proxy.send(plan(ADAPTERS, PER_ADAPTER, seed=2))
    second = served(survivors, before)
    print(f"after killing replica {victim + 1}:", second)
    new_home = owners(second)
    for name in ADAPTERS:
        old = fleet.urls[home[name]]
        if name not in moved:  # untouched by the departure
            assert survivors[new_home[name]] == old, f"{name} moved off a live replica"
