"""The adapter pool's exact slot map through loads, evictions, pins and unloads."""

import pytest

from lorag.adapters import Composition
from lorag.errors import AdapterNotFound, InvalidRequest
from lorag.server.engine import SamplingParams

ONE = SamplingParams(max_tokens=1, ignore_eos=True)


def use(engine, name):
    return engine.submit([1, 2, 3], ONE, adapter=name).result()


def test_slots_fill_first_free_then_evict_least_recently_used(make_engine, adapter_root):
    engine = make_engine()
    for name in ("t0", "t1", "t2", "t3"):
        assert engine.load_adapter(name, str(adapter_root / name)) is True
    assert engine.stats()["adapter_slots"] == {0: None, 1: None}  # loading != installing
    use(engine, "t0")
    assert engine.stats()["adapter_slots"] == {0: "t0", 1: None}
    use(engine, "t1")
    assert engine.stats()["adapter_slots"] == {0: "t0", 1: "t1"}
    use(engine, "t0")  # t0 becomes most recent; t1 is now least recently used
    use(engine, "t2")
    assert engine.stats()["adapter_slots"] == {0: "t0", 1: "t2"}
    assert engine.stats()["evictions"] == 1
    use(engine, "t3")
    assert engine.stats()["adapter_slots"] == {0: "t3", 1: "t2"}
    assert engine.stats()["adapter_refs"] == [0, 0]


def test_loading_a_name_again_is_idempotent_and_another_folder_under_it_refused(
        make_engine, adapter_root):
    engine = make_engine()
    assert engine.load_adapter("t0", str(adapter_root / "t0")) is True
    assert engine.load_adapter("t0", str(adapter_root / "t0")) is False
    with pytest.raises(InvalidRequest, match="already registered from"):
        engine.load_adapter("t0", str(adapter_root / "t1"))


def test_unloading_frees_the_slot_and_the_name(make_engine, adapter_root):
    engine = make_engine()
    engine.load_adapter("t0", str(adapter_root / "t0"))
    use(engine, "t0")
    assert engine.stats()["adapter_slots"] == {0: "t0", 1: None}
    assert engine.unload_adapter("t0") is True
    assert engine.stats()["adapter_slots"] == {0: None, 1: None}
    with pytest.raises(AdapterNotFound, match="adapter 't0' is not loaded"):
        engine.submit([1, 2, 3], ONE, adapter="t0")
    with pytest.raises(AdapterNotFound):
        engine.unload_adapter("t0")


def test_pinned_adapter_is_never_evicted(make_engine, adapter_root):
    engine = make_engine()
    for name in ("t0", "t1", "t2"):
        engine.load_adapter(name, str(adapter_root / name))
    assert engine.pin_adapter("t1") == 0
    assert engine.stats()["adapter_slots"] == {0: "t1", 1: None}
    with pytest.raises(InvalidRequest, match="one must stay free"):
        engine.pin_adapter("t2")
    for name in ("t0", "t2", "t0"):
        use(engine, name)
        assert engine.stats()["adapter_slots"][0] == "t1"
    assert engine.stats()["adapter_slots"] == {0: "t1", 1: "t0"}
    assert engine.unpin_adapter("t1") is True
    use(engine, "t2")  # t1 is least recent and unpinned now
    assert engine.stats()["adapter_slots"] == {0: "t2", 1: "t0"}


@pytest.mark.slow
def test_adapter_in_use_is_not_evicted_and_requests_wait_for_a_slot(make_engine, adapter_root):
    engine = make_engine(start=False)  # drive steps by hand
    for name in ("t0", "t1", "t2"):
        engine.load_adapter(name, str(adapter_root / name))
    long = SamplingParams(max_tokens=20, ignore_eos=True)
    first = [engine.submit([1, 2, 3], long, adapter=n) for n in ("t0", "t1")]
    third = engine.submit([1, 2, 3], ONE, adapter="t2")
    engine.step()
    assert engine.stats()["adapter_slots"] == {0: "t0", 1: "t1"}
    assert engine.stats()["adapter_refs"] == [1, 1]
    assert engine.stats()["waiting"] == 1  # t2 waits: both slots are referenced
    while engine.stats()["running"] or engine.stats()["waiting"]:
        engine.step()
    assert [len(s.result().token_ids) for s in first] == [20, 20]
    assert third.result().token_ids
    assert engine.stats()["adapter_slots"] == {0: "t2", 1: "t1"}
    assert engine.stats()["adapter_refs"] == [0, 0]


@pytest.mark.slow
def test_unload_while_running_lets_the_request_finish(make_engine, adapter_root):
    engine = make_engine(start=False)
    engine.load_adapter("t0", str(adapter_root / "t0"))
    stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True),
                           adapter="t0")
    engine.step()
    assert engine.unload_adapter("t0")  # the loop is not running: applied at once
    assert engine.stats()["adapter_slots"] == {0: "t0", 1: None}  # still referenced
    while engine.stats()["running"]:
        engine.step()
    assert len(stream.result().token_ids) == 5
    assert engine.stats()["adapter_slots"] == {0: None, 1: None}


@pytest.mark.slow
def test_unload_discards_exactly_the_compositions_that_use_the_adapter(make_engine,
                                                                        adapter_root):
    engine = make_engine()
    for name, folder in (("t0", "t0"), ("xt0", "t0"), ("u", "t1")):
        engine.load_adapter(name, str(adapter_root / folder))
    engine.submit([1, 2, 3], ONE, Composition((("xt0", 0.5), ("u", 1.0)))).result()
    engine.submit([1, 2, 3], ONE, Composition((("t0", 0.5), ("u", 1.0)))).result()
    assert engine.stats()["adapter_slots"] == {0: "xt0*0.5+u*1", 1: "t0*0.5+u*1"}
    engine.unload_adapter("t0")  # "xt0" merely ends in "t0": its composition stays
    assert engine.stats()["adapter_slots"] == {0: "xt0*0.5+u*1", 1: None}


def test_ram_tier_keeps_the_most_recent_adapters_within_its_byte_budget(make_engine,
                                                                       adapter_root):
    engine = make_engine(start=False)
    engine.load_adapter("t0", str(adapter_root / "t0"))
    one = engine.registry.ram_bytes
    budget = engine.registry.max_bytes = 2 * one + one // 2  # room for t0 and t1 only
    engine.load_adapter("t1", str(adapter_root / "t0"))
    engine.load_adapter("t2", str(adapter_root / "t0"))
    assert list(engine.registry.ram) == ["t1", "t2"]
    assert engine.registry.ram_bytes == 2 * one <= budget
    assert engine.registry.get("t0").rank == 4  # re-read from its file, evicting t1
    assert list(engine.registry.ram) == ["t2", "t0"]
    engine.unload_adapter("t2")
    assert list(engine.registry.ram) == ["t0"] and engine.registry.ram_bytes == one
