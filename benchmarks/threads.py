"""`lorag bench threads`: one box, one daemon or two, each with its share of the cores.

Replicas side by side on one machine (deploy/compose.yaml runs three) each size their
thread pools from the CPUs they see. Three peers get the same traffic (streamed chats on
the base model, a fixed number at once in all, split evenly over the daemons):

- one daemon with every core (`--threads N`);
- two daemons with half the cores each (`--threads N/2`), what `lorag serve` now picks
  by itself in containers given half the box (lorag/threads.py);
- two daemons with every core each (`--threads N`), what each picked before: twice as
  many OpenMP workers as cores, spinning against each other.

Each daemon is a `lorag serve` subprocess on the default model (NF4); the figures are
from the clients: generated tokens per second over the wall time of all of them, TTFT.
"""

import asyncio
import os
import tempfile
import time
from pathlib import Path

import torch

from lorag import catalog
from lorag.benchmarks.daemon import DaemonProcess
from lorag.benchmarks.fleet import stream_plan
from lorag.benchmarks.stats import print_json, summary
from lorag.threads import available_cpus

MODEL = catalog.DEFAULT_BASE_MODEL


async def _load(daemons: list[DaemonProcess], requests: int, concurrency: int,
                max_tokens: int) -> list[dict]:
    """`requests` streams over the daemons, `concurrency` at once in all, split evenly."""
    share = len(daemons)
    return [result for results in await asyncio.gather(*(
        stream_plan(daemon.url, [MODEL] * (requests // share), concurrency // share, max_tokens)
        for daemon in daemons)) for result in results]


def _peer(name: str, threads: list[int], folder: Path, requests: int, concurrency: int,
          max_tokens: int) -> dict:
    """Start one daemon per entry of `threads` (its --threads) with its data under
    `folder`, warm each with one request, then time the traffic."""
    daemons: list[DaemonProcess] = []
    try:
        for index, count in enumerate(threads):
            data = folder / f"daemon-{index}"
            data.mkdir(parents=True)
            daemons.append(DaemonProcess(data, ["--threads", str(count), "--served-model-name",
                                                MODEL], data / "daemon.log"))
        asyncio.run(_load(daemons, len(daemons), len(daemons), 4))  # warm-up
        start = time.perf_counter()
        results = asyncio.run(_load(daemons, requests, concurrency, max_tokens))
        wall = time.perf_counter() - start
    finally:
        for daemon in daemons:
            daemon.stop()
    return {"peer": name, "daemons": len(threads), "threads_each": threads[0],
            **summary(len(results) * max_tokens, wall, [r["ttft"] for r in results])}


def main(requests: int = 32, concurrency: int = 8, max_tokens: int = 64,
         json_path: Path | None = None) -> dict:
    """Run the three peers and print (and optionally save) JSON."""
    cores = available_cpus()
    if cores < 2:
        raise SystemExit("bench threads compares two daemons sharing the cores: it needs 2 "
                         f"CPUs or more, this process may use {cores}")
    if requests % 2 or concurrency % 2:
        raise SystemExit("--requests and --concurrency are split over two daemons: give "
                         "even numbers")
    folder = Path(tempfile.mkdtemp(prefix="lorag-threads-"))
    peers = [("one daemon, every core", [cores]),
             ("two daemons, half the cores each", [cores // 2] * 2),
             ("two daemons, every core each", [cores] * 2)]
    results = [_peer(name, threads, folder / f"peer-{i}", requests, concurrency, max_tokens)
               for i, (name, threads) in enumerate(peers)]
    report = {"workload": {"model": MODEL, "quantize": "nf4", "requests": requests,
                           "concurrency": concurrency, "max_tokens": max_tokens,
                           "cores": cores, "affinity": len(os.sched_getaffinity(0)),
                           "torch": torch.__version__},
              "peers": results}
    print_json(report, json_path)
    return report
