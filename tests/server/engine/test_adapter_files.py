"""An adapter's folder rewritten or deleted while the engine serves it: a name stands for
the content that was registered. Weights in memory keep serving (a running request
finishes with the tokens it would have produced anyway); a re-read after eviction that
finds other bytes, or none, is refused with AdapterChanged, never served under the name;
registering again serves the new files."""

import shutil

import pytest

from lorag.adapters import content_version
from lorag.errors import AdapterChanged
from lorag.server.engine import SamplingParams

LONG = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


def tokens(engine, adapter: str, prompt: str = "The adapter under the knife") -> list[int]:
    return [t for out in engine.submit(prompt, LONG, adapter) for t in out.token_ids]


def register(engine, root, name: str) -> str:
    version = content_version(root / name, [root])
    engine.load_adapter(name, str(root / name), version=version)
    return version


@pytest.fixture
def engine(make_engine):
    # one adapter in RAM and one in a compute slot: loading another evicts the last one
    return make_engine(max_cpu_adapter_bytes=1, max_active_adapters=1)


@pytest.mark.slow
def test_a_rewritten_folder_never_serves_under_the_registered_name(engine, adapter_root):
    register(engine, adapter_root, "t0")
    alone = tokens(engine, "t0")
    running = engine.submit("The adapter under the knife", LONG, "t0")
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # t1: rank 8, not 4
        shutil.copy(adapter_root / "t1" / name, adapter_root / "t0" / name)
    assert [t for out in running for t in out.token_ids] == alone
    assert tokens(engine, "t0") == alone  # still in memory: the registered weights

    register(engine, adapter_root, "t2")  # t0 leaves RAM
    assert tokens(engine, "t2") and not engine.registry.in_ram("t0")  # and its slot
    with pytest.raises(AdapterChanged, match=r"adapter 't0' can no longer be read as it was "
                                             r"registered \(.*not the ones registered"):
        engine.submit("hi", LONG, "t0")
    assert engine.alive and tokens(engine, "t2")  # nothing else minds

    engine.unload_adapter("t0")  # an admin registers the new files
    register(engine, adapter_root, "t0")
    assert tokens(engine, "t0") == tokens(engine, "t0") != alone


@pytest.mark.slow
def test_a_deleted_folder_is_refused_once_its_weights_left_memory(engine, adapter_root):
    register(engine, adapter_root, "t0")
    alone = tokens(engine, "t0")
    running = engine.submit("The adapter under the knife", LONG, "t0")
    shutil.rmtree(adapter_root / "t0")
    assert [t for out in running for t in out.token_ids] == alone
    register(engine, adapter_root, "t1")
    assert tokens(engine, "t1")  # t0 leaves RAM and its slot
    with pytest.raises(AdapterChanged, match="adapter 't0' can no longer be read .*is not a "
                                             "folder.*register it again, or unload it"):
        engine.submit("hi", LONG, "t0")
    assert engine.alive


def test_a_restored_record_checks_the_registered_content(engine, adapter_root):
    """A daemon restarting restores names lazily, with the recorded version."""
    version = content_version(adapter_root / "t0", [adapter_root])
    shutil.copy(adapter_root / "t3" / "adapter_config.json", adapter_root / "t0")
    engine.load_adapter("t0", str(adapter_root / "t0"), lazy=True, version=version)
    with pytest.raises(AdapterChanged, match="not the ones registered"):
        engine.submit("hi", LONG, "t0")
