"""A fleet on one box, and `lorag bench fleet`: adapter affinity vs round-robin.

The parts are real: three `lorag serve` processes on loopback over one state database,
behind HAProxy (Debian's package) running deploy/haproxy/haproxy.cfg, the configuration
deploy/compose.yaml runs: a consistent hash of the request body's `model`. The peer is
the same configuration with `balance roundrobin`. Both see the same traffic (a seeded
shuffle of requests over many adapters, a few at once) and are measured from each
replica's /metrics: requests per adapter, adapter slot loads, adapters held in RAM.
The affinity test (tests/deploy/test_affinity.py) uses the same parts.
"""

import asyncio
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lorag.benchmarks.daemon import DaemonProcess, free_port, register_adapters
from lorag.benchmarks.retrieval import percentiles
from lorag.benchmarks.stats import print_json
from lorag.client import sse_event
from lorag.errors import InvalidRequest
from lorag.threads import available_cpus

HAPROXY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"
REPLICAS = 3  # the servers haproxy.cfg names
MODEL = "smollm2-135m-instruct"


class Fleet:
    """REPLICAS `lorag serve` processes on one state database and one adapter root,
    started at once; `flags` go to every replica, and each gets its share of the cores
    (--threads; at least 1: three replicas on two cores run three threads)."""

    def __init__(self, folder: Path, flags: list[str], state: str):
        self.folder = folder
        share = str(max(1, available_cpus() // REPLICAS))

        def start(index: int) -> DaemonProcess:
            data = folder / f"replica-{index + 1}"
            data.mkdir(parents=True, exist_ok=True)
            return DaemonProcess(data, ["--threads", share, *flags, "--state", state,
                                        "--state-poll-interval", "0.5"], data / "daemon.log")

        with ThreadPoolExecutor(REPLICAS) as pool:
            starts = [pool.submit(start, index) for index in range(REPLICAS)]
            try:
                self.replicas = [started.result() for started in starts]
            except BaseException:  # one did not start, or the caller is stopping
                for started in starts:  # stop the others (waits for starts under way)
                    if started.exception() is None:
                        started.result().stop()
                raise

    @property
    def urls(self) -> list[str]:
        return [replica.url for replica in self.replicas]

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.process.poll() is None:
                replica.stop()


class Haproxy:
    """HAProxy running deploy/haproxy/haproxy.cfg in front of `replicas` (host:port each);
    `balance` replaces the configuration's balancing (the round-robin peer)."""

    def __init__(self, replicas: list[str], folder: Path, balance: str | None = None):
        binary = shutil.which("haproxy")
        if binary is None:
            raise InvalidRequest("haproxy is not installed: apt-get install haproxy",
                                 field="haproxy")
        if not HAPROXY_CONFIG.exists():
            raise InvalidRequest(f"{HAPROXY_CONFIG} is missing: run from a lorag checkout",
                                 field="haproxy")
        config = HAPROXY_CONFIG.read_text()
        if balance is not None:
            config, found = re.subn(r"(?m)^    balance .*$", f"    balance {balance}", config)
            config = re.sub(r"(?m)^    hash-type .*\n", "", config)
            assert found == 1, f"{HAPROXY_CONFIG} has no single `balance` line"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "haproxy.cfg"
        path.write_text(config)
        self.listen, self.stats = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        self.url = f"http://{self.listen}"
        env = {**os.environ, "LORAG_LISTEN": self.listen, "LORAG_STATS": self.stats,
               **{f"LORAG_REPLICA_{i + 1}": address for i, address in enumerate(replicas)}}
        self.log = folder / "haproxy.log"
        self.process = subprocess.Popen([binary, "-f", str(path), "-db"], env=env,
                                        stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        try:
            self.wait_for(lambda status: all(s == "UP" for s in status.values()),
                          "every server UP")
        except BaseException:  # not up, or the caller is stopping: no orphan
            self.stop()
            raise

    def servers(self) -> dict[str, str]:
        """Each replica's status as HAProxy's health checks see it (UP, DOWN, ...)."""
        csv = httpx.get(f"http://{self.stats}/stats;csv", timeout=5).text
        header, *rows = csv.lstrip("# ").splitlines()
        columns = header.split(",")
        status = {}
        for row in rows:
            fields = dict(zip(columns, row.split(","), strict=False))
            if fields.get("pxname") == "replicas" and fields["svname"].startswith("lorag-"):
                status[fields["svname"]] = fields["status"].split(" ")[0]
        return status

    def wait_for(self, done, what: str, timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.log.read_text()[-2000:]}")
            try:
                status = self.servers()
                if done(status):
                    return status
            except httpx.HTTPError:
                status = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy: no {what} within {timeout:g} s: {status}")
            time.sleep(0.2)

    def send(self, requests: list[str], concurrency: int = 4, max_tokens: int = 4
             ) -> list[dict]:
        """`send` through this proxy."""
        return send(self.url, requests, concurrency, max_tokens)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def scrape(url: str) -> dict[str, list]:
    """A replica's /metrics: family name -> samples."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def requests_by_adapter(metrics: dict[str, list]) -> dict[str, float]:
    """Finished requests per adapter label (every finish reason), from `scrape`."""
    counts: dict[str, float] = {}
    for sample in metrics.get("lorag_requests", []):
        if sample.name == "lorag_requests_total":
            adapter = sample.labels["adapter"]
            counts[adapter] = counts.get(adapter, 0) + sample.value
    return counts


def resident(metrics: dict[str, list], tier: str) -> set[str]:
    """The adapters resident in `tier` ("ram" or "active": a compute slot)."""
    return {s.labels["adapter"] for s in metrics.get("lorag_adapter_resident", [])
            if s.labels["tier"] == tier and s.value}


def counter(metrics: dict[str, list], family: str) -> float:
    return sum(s.value for s in metrics.get(family, []) if s.name.endswith("_total"))


async def stream_plan(url: str, plan: list[str], concurrency: int, max_tokens: int
                   ) -> list[dict]:
    """Stream each request of `plan` (adapter names), `concurrency` at once."""
    queue: asyncio.Queue = asyncio.Queue()
    for index, adapter in enumerate(plan):
        queue.put_nowait((index, adapter))
    results: list[dict] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            index, adapter = queue.get_nowait()
            body = {"model": adapter, "max_tokens": max_tokens, "ignore_eos": True,
                    "stream": True, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Request {index}: hello."}]}
            start, first = time.perf_counter(), None
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{adapter}: {response.status_code} "
                                       f"{(await response.aread()).decode()}")
                async for line in response.aiter_lines():
                    if first is None and sse_event(line):
                        first = time.perf_counter()
            results.append({"adapter": adapter, "ttft": (first or time.perf_counter()) - start})

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return results


def send(url: str, plan: list[str], concurrency: int = 4, max_tokens: int = 4) -> list[dict]:
    """Send `plan` (one streamed chat per adapter name, `max_tokens` each: ignore_eos)
    through `url`; per request: the adapter and its time to first token."""
    return asyncio.run(stream_plan(url, plan, concurrency, max_tokens))


def plan(adapters: list[str], per_adapter: int, seed: int = 0) -> list[str]:
    """Every adapter `per_adapter` times, in a seeded shuffle: mixed traffic."""
    requests = [name for name in adapters for _ in range(per_adapter)]
    random.Random(seed).shuffle(requests)
    return requests


def _run_peer(name: str, balance: str | None, folder: Path, flags: list[str],
              adapters: dict[str, Path], requests: list[str], concurrency: int,
              max_tokens: int) -> dict:
    """One routing peer on a fresh fleet (cold replicas, a fresh state database)."""
    state = f"sqlite:///{folder / name / 'lorag.db'}"  # one file the replicas share
    (folder / name).mkdir(parents=True)
    fleet = Fleet(folder / name, flags, state)
    proxy = None
    try:
        register_adapters(fleet.urls[0], adapters)
        proxy = Haproxy([url.removeprefix("http://") for url in fleet.urls], folder / name,
                        balance)
        start = time.perf_counter()
        results = proxy.send(requests, concurrency, max_tokens)
        elapsed = time.perf_counter() - start
        metrics = [scrape(url) for url in fleet.urls]
    finally:
        if proxy is not None:
            proxy.stop()
        fleet.stop()
    return {"routing": name, **_summary(results, elapsed, metrics, list(adapters),
                                         max_tokens)}


def _summary(results: list[dict], elapsed: float, metrics: list[dict], adapters: list[str],
             max_tokens: int) -> dict:
    """A peer's figures: from the clients (throughput, TTFT) and from each replica's
    /metrics (slot loads, evictions, RAM reads, where each adapter was served)."""
    served = [requests_by_adapter(m) for m in metrics]
    ttft = percentiles([r["ttft"] for r in results])
    spread = [sum(1 for replica in served if replica.get(f"default.{name}"))
              for name in adapters]
    return {"requests": len(results),
            "throughput_tok_s": round(len(results) * max_tokens / elapsed, 1),
            "ttft_p50_ms": round(ttft["p50_ms"], 1), "ttft_p99_ms": round(ttft["p99_ms"], 1),
            "adapter_slot_loads": int(sum(counter(m, "lorag_adapter_slot_loads")
                                          for m in metrics)),
            "adapter_evictions": int(sum(counter(m, "lorag_adapter_evictions")
                                         for m in metrics)),
            "adapters_read_into_ram": sum(len(resident(m, "ram")) for m in metrics),
            "replicas_per_adapter": round(sum(spread) / len(adapters), 2),
            "requests_per_replica": [int(sum(replica.values())) for replica in served]}


def main(adapters: int = 24, per_adapter: int = 8, slots: int = 8, concurrency: int = 6,
         max_tokens: int = 16, json_path: Path | None = None) -> dict:
    """Affinity vs round-robin on the default model (float32: this CPU has no fast bf16),
    each on a fresh fleet."""
    from lorag.benchmarks.adapters import AdapterSpec, make_adapters
    from lorag.models import load_base

    folder = Path(tempfile.mkdtemp(prefix="lorag-fleet-"))
    model, _ = load_base(MODEL, quantize="none", dtype="float32")
    names = [f"ad{i}" for i in range(adapters)]
    paths = make_adapters(model, folder / "adapters",
                          {name: AdapterSpec(rank=16, alpha=32, scale=0.02) for name in names})
    del model
    flags = ["--model", MODEL, "--quantize", "none", "--dtype", "float32",
             "--adapter-root", str(folder / "adapters"),
             "--max-active-adapters", str(slots), "--max-lora-rank", "16",
             "--max-model-len", "512", "--max-num-seqs", "8"]
    requests = plan(names, per_adapter)
    peers = [_run_peer(name, balance, folder, flags, paths, requests, concurrency, max_tokens)
             for name, balance in (("affinity", None), ("round-robin", "roundrobin"))]
    result = {"workload": {"model": MODEL, "dtype": "float32", "replicas": REPLICAS,
                           "adapters": adapters, "requests": len(requests),
                           "slots_per_replica": slots, "concurrency": concurrency,
                           "max_tokens": max_tokens, "router": "haproxy " + _haproxy_version()},
              "peers": peers}
    print_json(result, json_path)
    shutil.rmtree(folder, ignore_errors=True)
    return result


def _haproxy_version() -> str:
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    return out.split()[2] if out else "?"
