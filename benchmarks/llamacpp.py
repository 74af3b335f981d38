"""llama.cpp, what CPU users pick, as a peer: built here, run as its own server.

`python -m lorag.benchmarks.llamacpp` (`make bench-setup`) provisions it under
$LORAG_HOME/llama.cpp, each step once:
- the source: the llama.cpp tree that the PyPI sdist of llama-cpp-python vendors
  (LLAMA_CPP_PYTHON, pinned: the registry is reachable here, GitHub is not);
- `llama-server` and `llama-quantize`, built with cmake for this CPU;
- the default base model as GGUF, converted from lorag's model folder by llama.cpp's own
  `convert_hf_to_gguf.py` in f32, f16 and bf16, and quantized to Q4_0 by `llama-quantize`
  (Q4_0, not Q4_K: SmolLM2's 576-wide rows are not a multiple of Q4_K's 256).

Adapters are not provisioned: the benchmarks make theirs at run time and write each with
`lorag export --gguf` (lorag.trainer.gguf). `LlamaServer` runs `llama-server` on a free
loopback port with adapters preloaded (`--lora`, off until a request names them in its
`lora` field), parallel slots and continuous batching.
"""

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from rich.console import Console

from lorag.benchmarks.daemon import free_port, wait_until_healthy
from lorag.settings import Settings

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
BINARIES = ("llama-server", "llama-quantize")
FORMATS = ("f32", "f16", "bf16", "q4_0")  # base files: converted, and quantized (q4_0)


class LlamaCpp:
    """Where the provisioned llama.cpp lives: $LORAG_HOME/llama.cpp by default."""

    def __init__(self, root: Path | None = None):
        self.root = (root or Settings().home / "llama.cpp").expanduser()
        self.source = self.root / "src"

    def binary(self, name: str) -> Path:
        return self.source / "build" / "bin" / name

    def model(self, name: str, fmt: str) -> Path:
        return self.root / "models" / f"{name}-{fmt}.gguf"

    def missing(self, name: str) -> str | None:
        """Why the llama.cpp rows cannot run for base `name`, or None."""
        needed = [self.binary(b) for b in BINARIES] + [self.model(name, f) for f in FORMATS]
        absent = [str(path) for path in needed if not path.exists()]
        return f"llama.cpp is not set up ({absent[0]} is missing): run `make bench-setup`" \
            if absent else None

    def setup(self, name: str, folder: Path, console: Console) -> None:
        """Source, build and base model files, each only if not there yet."""
        if not (self.source / "CMakeLists.txt").is_file():
            console.print(f"llama.cpp: downloading the {LLAMA_CPP_PYTHON} sdist")
            self._unpack_source()
        if not all(self.binary(b).is_file() for b in BINARIES):
            console.print("llama.cpp: building llama-server and llama-quantize (cmake)")
            self._build()
        for fmt in ("f32", "f16", "bf16"):
            if not self.model(name, fmt).is_file():
                console.print(f"llama.cpp: converting {name} to GGUF {fmt}")
                self._run(sys.executable, self.source / "convert_hf_to_gguf.py", folder,
                          "--outtype", fmt, "--outfile", self._partial(name, fmt))
                self._partial(name, fmt).rename(self.model(name, fmt))
        if not self.model(name, "q4_0").is_file():
            console.print(f"llama.cpp: quantizing {name} to Q4_0")
            self._run(self.binary("llama-quantize"), self.model(name, "f32"),
                      self._partial(name, "q4_0"), "Q4_0")
            self._partial(name, "q4_0").rename(self.model(name, "q4_0"))

    def _partial(self, name: str, fmt: str) -> Path:
        self.model(name, fmt).parent.mkdir(parents=True, exist_ok=True)
        return self.model(name, fmt).with_suffix(".partial")

    def _unpack_source(self) -> None:
        with tempfile.TemporaryDirectory() as work:
            self._run(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                      ":all:", "--disable-pip-version-check", "-d", work, LLAMA_CPP_PYTHON)
            sdist = next(Path(work).glob("*.tar.gz"))
            with tarfile.open(sdist) as archive:
                archive.extractall(work, filter="data")
            vendored = next(Path(work).glob("*/vendor/llama.cpp"))
            shutil.rmtree(self.source, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.move(vendored, self.source)

    def _build(self) -> None:
        build = self.source / "build"
        self._run("cmake", "-S", self.source, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                  "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                  "-DGGML_NATIVE=ON")
        self._run("cmake", "--build", build, "--parallel", "--target", *BINARIES)

    @staticmethod
    def _run(*command) -> None:
        result = subprocess.run([str(part) for part in command], capture_output=True,
                                text=True)
        if result.returncode != 0:
            said = (result.stderr or result.stdout)[-2000:]
            raise RuntimeError(f"`{' '.join(map(str, command[:3]))} ...` failed "
                               f"({result.returncode}): {said}")


class LlamaServer:
    """`llama-server` on a free loopback port: the model, adapters preloaded but applied
    only per request, `parallel` slots sharing a `parallel * slot_tokens` context."""

    def __init__(self, llama: LlamaCpp, model: Path, adapters: list[Path], parallel: int,
                 slot_tokens: int, threads: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        loras = [arg for path in adapters for arg in ("--lora", str(path))]
        self.command = [str(llama.binary("llama-server")), "-m", str(model), *loras,
                        "--lora-init-without-apply", "--host", "127.0.0.1",
                        "--port", str(self.port), "--parallel", str(parallel),
                        "--ctx-size", str(parallel * slot_tokens), "--cont-batching",
                        "--threads", str(threads), "--threads-batch", str(threads),
                        "--no-webui"]
        self.log = log

    def __enter__(self) -> "LlamaServer":
        self.process = subprocess.Popen(self.command, stdout=self.log.open("ab"),
                                        stderr=subprocess.STDOUT)
        try:
            wait_until_healthy(self.process, self.url, self.log, "llama-server", timeout=300)
        except BaseException:  # it did not start, or the caller is stopping: no orphan
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def completion_body(ids: list[int], max_new: int, adapter: int | None, count: int,
                    ignore_eos: bool = True) -> dict:
    """A greedy /completion request for token ids with adapter number `adapter` of the
    `count` preloaded ones applied (None: the base alone). Every adapter is listed, the
    others at scale 0, so the server never falls back to its launch-time scales.
    llama.cpp's ignore_eos bans end-of-generation tokens (lorag's, as vLLM's, only keeps
    going past them): compare greedy tokens without it."""
    return {"prompt": ids, "n_predict": max_new, "temperature": 0, "top_k": 1,
            "ignore_eos": ignore_eos, "cache_prompt": False, "return_tokens": True,
            "lora": [{"id": i, "scale": 1.0 if i == adapter else 0.0} for i in range(count)]}


def main() -> None:
    """Provision llama.cpp and the default base model's GGUF files (`make bench-setup`)."""
    from lorag import catalog
    from lorag.provision import ModelCache

    console = Console(stderr=True)
    entry = catalog.lookup(catalog.DEFAULT_BASE_MODEL)
    folder = ModelCache(Settings().models_dir).pull(entry)
    llama = LlamaCpp()
    llama.setup(entry.name, folder, console)
    console.print(f"llama.cpp ready under {llama.root}")


if __name__ == "__main__":
    main()
