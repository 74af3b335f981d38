"""A benchmark stopped with SIGTERM (a CI timeout, `kill`, a closed session) stops what it
started: here `lorag bench rag`'s daemon, a `lorag serve` child process."""

import signal
import subprocess
import sys
import time

import psutil
import pytest


def _daemon_child(bench: psutil.Process, timeout: float) -> psutil.Process:
    """The bench's `lorag serve` child, once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert bench.is_running(), "the benchmark exited before it started a daemon"
        for child in bench.children():
            try:
                if "serve" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    raise AssertionError(f"no daemon started within {timeout} s")


@pytest.mark.slow
def test_sigterm_stops_the_benchmark_and_the_daemon_it_started(tiny_base, tmp_path):
    command = [sys.executable, "-m", "lorag", "bench", "rag", "--model", str(tiny_base),
               "--adapters", "2", "--documents", "6", "--hot", "2", "--questions", "100000",
               "--clients", "2", "--max-tokens", "4", "--top-k", "2", "--kv-blocks", "64",
               "--json", str(tmp_path / "rag.json")]
    log = tmp_path / "bench.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    daemon = None
    try:
        # as soon as the daemon exists, while the bench waits for its /health: the window
        # that the benchmark's finally blocks alone do not cover
        daemon = _daemon_child(psutil.Process(process.pid), timeout=120)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()[-2000:]
        assert not daemon.is_running(), "the daemon outlived the benchmark"
    finally:
        if process.poll() is None:
            process.kill()
        if daemon is not None and daemon.is_running():
            daemon.kill()
