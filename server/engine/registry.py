"""AdapterRegistry: adapter names -> validated weights, with a RAM tier (LRU by bytes)."""

import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch

from lorag.adapters import BaseShape, LoraWeights, load_lora
from lorag.errors import AdapterChanged, AdapterNotFound, InvalidRequest
from lorag.names import MAX_KEY_LENGTH, check_adapter_name


class Registration(NamedTuple):
    """What a name stands for: its folder, and the content version registered (None: any)."""

    path: Path
    version: str | None


class AdapterRegistry:
    """Knows every registered adapter; keeps the recently used ones in RAM.

    Thread-safe: the daemon's handlers register and the step loop reads. File reading and
    validation run in the caller's thread, outside the lock and off the step loop.

    A name stands for the files' content when it was registered (`version`, their
    content_version), not for whatever the folder holds later: weights in RAM keep serving
    when the folder is rewritten or deleted, and one re-read after eviction that finds
    other bytes, or none, is refused (AdapterChanged) rather than served under the name.
    """

    def __init__(self, base: BaseShape, roots: list[Path], max_rank: int, max_bytes: int,
                 dtype: torch.dtype):
        self.base, self.roots, self.max_rank, self.max_bytes = base, roots, max_rank, max_bytes
        self.dtype = dtype  # weights are kept in the serving dtype
        self.registered: dict[str, Registration] = {}
        self.ram: OrderedDict[str, LoraWeights] = OrderedDict()  # least recent first
        self.ram_bytes = 0  # sum of nbytes over self.ram
        self.lock = threading.Lock()

    def register(self, name: str, path: str | Path, version: str | None = None) -> bool:
        """Validate and load the adapter at `path` as `name` (with `version`, only if the
        files' content is that one).

        Idempotent: the same name and path again refreshes its LRU position and returns
        False; a new adapter returns True. A name already taken by another path is refused.
        """
        check_adapter_name(name, "name", MAX_KEY_LENGTH)
        resolved = Path(path).expanduser().resolve()
        with self.lock:
            known = self.registered.get(name)
        if known is not None and known.path != resolved:
            raise InvalidRequest(f"adapter {name!r} is already registered from {known.path}; "
                                 "unload it first", field="name")
        if known == (resolved, version) and name in self.ram:
            self.get(name)
            return False
        lora = load_lora(name, path, self.base, self.roots, self.max_rank, self.dtype, version)
        with self.lock:
            self.registered[name] = Registration(resolved, version)
            self._keep(lora)
        return known is None

    def remember(self, name: str, path: str | Path, version: str | None = None) -> None:
        """Know `name` at `path` without reading it now (a daemon restoring its registry
        after a restart); it is read and validated on first use, like an evicted one."""
        with self.lock:
            self.registered[name] = Registration(Path(path).expanduser().resolve(), version)

    def get(self, name: str) -> LoraWeights:
        """The adapter's weights, re-read from its files if it left RAM: the registered
        content, else AdapterChanged (the files were rewritten or deleted since)."""
        with self.lock:
            if name in self.ram:
                self.ram.move_to_end(name)
                return self.ram[name]
            registration = self.registered.get(name)
        if registration is None:
            raise AdapterNotFound.named(name)
        try:
            lora = load_lora(name, registration.path, self.base, self.roots, self.max_rank,
                             self.dtype, registration.version)
        except (AdapterChanged, InvalidRequest) as e:
            raise AdapterChanged(
                f"adapter {name!r} can no longer be read as it was registered ({e.message}); "
                "register it again, or unload it") from e
        with self.lock:
            self._keep(lora)
        return lora

    def unregister(self, name: str) -> bool:
        """Forget `name`; says whether it was registered."""
        with self.lock:
            self._drop(name)
            return self.registered.pop(name, None) is not None

    def __contains__(self, name: str) -> bool:
        return name in self.registered

    def names(self) -> list[str]:
        """Registered adapter names, sorted."""
        with self.lock:
            return sorted(self.registered)

    def path(self, name: str) -> Path | None:
        """The folder `name` was registered from (None: not registered)."""
        registration = self.registered.get(name)
        return None if registration is None else registration.path

    def in_ram(self, name: str) -> bool:
        """Whether `name` is in the RAM tier now."""
        return name in self.ram

    def _keep(self, lora: LoraWeights) -> None:
        # Caller holds the lock. The newest adapter always stays, even over budget.
        self._drop(lora.name)
        self.ram[lora.name] = lora
        self.ram_bytes += lora.nbytes
        while len(self.ram) > 1 and self.ram_bytes > self.max_bytes:
            self._drop(next(iter(self.ram)))

    def _drop(self, name: str) -> None:
        # Caller holds the lock.
        lora = self.ram.pop(name, None)
        if lora is not None:
            self.ram_bytes -= lora.nbytes
