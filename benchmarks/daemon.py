"""`lorag serve` in a subprocess on free loopback ports, as the load test and the daemon's
e2e tests run it: started, waited for until /health answers, stopped with SIGTERM
like a service manager would."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def register_adapters(url: str, adapters: dict[str, Path]) -> None:
    """Load each adapter (name -> folder) into the daemon at `url`, vLLM's route; on a
    fleet, every replica then finds it in the shared state."""
    with httpx.Client(base_url=url, timeout=120) as http:
        for name, path in adapters.items():
            http.post("/v1/load_lora_adapter",
                      json={"lora_name": name, "lora_path": str(path)}).raise_for_status()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, url: str, log: Path, what: str,
                       timeout: float) -> None:
    """Poll `url`/health until it answers 200; RuntimeError with the log's tail if the
    process exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not start: {log.read_text()[-3000:]}")


class DaemonProcess:
    """A running `lorag serve --data-dir DATA_DIR FLAGS...`; its output goes to `log`."""

    def __init__(self, data_dir: Path, flags: list[str], log: Path, timeout: float = 180,
                 env: dict[str, str] | None = None):
        self.port, self.grpc_port = free_port(), free_port()
        self.env = {**(env or os.environ), "HF_HUB_OFFLINE": "1"}
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log = log
        self.timeout = timeout
        self.command = [sys.executable, "-m", "lorag", "serve", "--port", str(self.port),
                        "--grpc-port", str(self.grpc_port), "--data-dir", str(data_dir), *flags]
        self.start()

    def start(self) -> None:
        """Start the process and wait until /health answers."""
        self.process = subprocess.Popen(self.command, stdout=self.log.open("ab"),
                                        stderr=subprocess.STDOUT,
                                        env=self.env)
        try:
            wait_until_healthy(self.process, self.url, self.log, "the daemon", self.timeout)
        except BaseException:  # it did not start, or the caller is stopping: no orphan
            self.stop()
            raise

    def restart(self) -> None:
        """Stop, then start again on the same data dir and ports (a redeploy)."""
        self.stop()
        self.start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
