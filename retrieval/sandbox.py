"""Files from strangers parsed in a process of their own, with a time and a memory limit.

The daemon reads uploaded files (PDF, HTML, text, JSON lines) with the loaders `lorag
ingest` uses (retrieval/ingest.py). A hostile or broken file can make a parser loop for
ever, allocate gigabytes (a decompression bomb) or crash; in the daemon's process that
would cost every tenant. So uploads are parsed by a child process, one file at a time:
its address space is capped at PARSE_MEMORY_BYTES beyond what it needs to start, and the
parent waits PARSE_TIMEOUT_S for each file. A file that overruns either, or kills the
child, costs one InvalidRequest for that file; the child is replaced for the next one.

    python -m lorag.retrieval.sandbox MEMORY_BYTES   # the child: JSON lines in and out
"""

import json
import queue
import resource
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from lorag.errors import InvalidRequest
from lorag.retrieval.ingest import Document, load

PARSE_TIMEOUT_S = 30.0  # per file
PARSE_MEMORY_BYTES = 1 << 30  # per file, beyond the child's own start-up


class Parser:
    """A child process that reads files into documents; `with Parser() as parser:`."""

    def __init__(self, timeout_s: float = PARSE_TIMEOUT_S,
                 memory_bytes: int = PARSE_MEMORY_BYTES):
        self.timeout_s, self.memory_bytes = timeout_s, memory_bytes
        self.process: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def __enter__(self) -> "Parser":
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def load(self, path: Path, doc_id: str) -> list[Document]:
        """The documents in `path`, as `ingest.load` reads them; InvalidRequest when the
        file cannot be read, needs too long or too much memory, or kills the parser."""
        if self.process is None:
            self._start()
        self.process.stdin.write(json.dumps([str(path), doc_id]) + "\n")
        self.process.stdin.flush()
        try:
            line = self.lines.get(timeout=self.timeout_s)
        except queue.Empty:
            self._stop()
            raise InvalidRequest(f"{path} took longer than {self.timeout_s:g} s to read; "
                                 "it was given up") from None
        if line is None:  # the child died on this file
            self._stop()
            raise InvalidRequest(f"{path} could not be read: the parser died on it")
        answer = json.loads(line)
        if "error" in answer:
            raise InvalidRequest(answer["error"])
        return [Document(**document) for document in answer["documents"]]

    def _start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lorag.retrieval.sandbox", str(self.memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        self.lines = queue.Queue()  # a fresh one: nothing of a dead child's is read
        threading.Thread(target=_forward, args=(self.process.stdout, self.lines),
                         name="lorag-parser", daemon=True).start()

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def _forward(stream, lines: queue.Queue) -> None:
    """The child's answers, a line each, then None when it ends."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def _serve(memory_bytes: int) -> None:
    """The child: cap the address space, then answer one JSON line per file asked."""
    with open("/proc/self/status") as status:  # what it needs already, in bytes
        size = next(int(line.split()[1]) << 10 for line in status
                    if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + memory_bytes, size + memory_bytes))
    for line in sys.stdin:
        path, doc_id = json.loads(line)
        try:
            answer = {"documents": [asdict(document) for document in load(Path(path), doc_id)]}
        except InvalidRequest as e:
            answer = {"error": e.message}
        except MemoryError:
            answer = {"error": f"{path} could not be read within {memory_bytes >> 20} MiB"}
        except Exception as e:  # noqa: BLE001 - a parser's own bug, on this file only
            answer = {"error": f"{path} could not be read: the parser failed on it "
                               f"({type(e).__name__})"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
