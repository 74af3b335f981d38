"""AdapterPool: the compute tier, a fixed number of adapter slots in every LoRA layer."""

from collections import OrderedDict
from collections.abc import Callable

from lorag.adapters import AdapterKey, LoraWeights
from lorag.errors import InvalidRequest
from lorag.server.engine.lora import LoraBatch, MultiLoraLinear


class AdapterPool:
    """Maps adapters to slots. An adapter referenced by a running request never leaves.

    Slots fill first-free; when all are taken, the least recently used slot that is
    neither referenced nor pinned is overwritten. The step loop is the only caller, so no
    lock is needed; installs happen between steps.
    """

    def __init__(self, layers: list[MultiLoraLinear], num_slots: int, batch: LoraBatch):
        self.layers = layers
        self.batch = batch  # told which slots hold DoRA or IA3 adapters
        self.names: list[AdapterKey | None] = [None] * num_slots
        self.ranks = [0] * num_slots
        self.versions = [""] * num_slots  # a digest of the weights in each slot
        self.refs = [0] * num_slots
        self.pinned: set[AdapterKey] = set()
        self.doomed: set[AdapterKey] = set()  # unloaded while in use: cleared at last release
        # key -> slot, least recently used first
        self.lru: OrderedDict[AdapterKey, int] = OrderedDict()
        self.evictions = 0
        # per slot, how many times its weights were written: a weight derived from a slot
        # (the engine's merged weight) is stale once this moves, whatever the name
        self.installs = [0] * num_slots

    def slot_of(self, name: AdapterKey) -> int | None:
        """The slot holding `name`, or None."""
        return self.lru.get(name)

    def slot_map(self) -> dict[int, str | None]:
        """slot -> adapter name, or a composition as it reads (None for a free slot)."""
        return {slot: None if key is None else str(key) for slot, key in enumerate(self.names)}

    def acquire(self, name: AdapterKey, load: Callable[[], LoraWeights]) -> int | None:
        """Reference `name`'s slot, installing `load()` if it is not resident.

        Returns None when every slot is referenced or pinned (the caller waits).
        """
        slot = self.slot_of(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            try:
                self._install(slot, load())
            except BaseException:
                self._zero(slot)  # a half-installed slot is free and holds nothing
                raise
        self.refs[slot] += 1
        self.lru.move_to_end(name)
        return slot

    def release(self, slot: int) -> None:
        """Drop one reference; an adapter unloaded meanwhile is cleared at its last one."""
        self.refs[slot] -= 1
        name = self.names[slot]
        if self.refs[slot] == 0 and name in self.doomed:
            self.doomed.discard(name)
            self._clear(slot)

    def discard(self, name: AdapterKey) -> bool:
        """Remove `name` from its slot now, or at its last release if in use."""
        slot = self.slot_of(name)
        if slot is None:
            return False
        self.pinned.discard(name)
        if self.refs[slot]:
            self.doomed.add(name)
        else:
            self._clear(slot)
        return True

    def pin(self, name: AdapterKey, load: Callable[[], LoraWeights]) -> int:
        """Keep `name` resident until unpinned; one slot always stays unpinned."""
        if name not in self.pinned and len(self.pinned) + 1 >= len(self.names):
            raise InvalidRequest(f"cannot pin {name!r}: {len(self.pinned)} of "
                                 f"{len(self.names)} slots are pinned and one must stay free",
                                 field="name")
        slot = self.acquire(name, load)
        if slot is None:
            raise InvalidRequest(f"cannot pin {name!r}: every slot is in use", field="name")
        self.release(slot)
        self.pinned.add(name)
        return slot

    def unpin(self, name: AdapterKey) -> bool:
        """Let `name` be evicted again; says whether it was pinned."""
        was = name in self.pinned
        self.pinned.discard(name)
        return was

    def _free_slot(self) -> int | None:
        if None in self.names:
            return self.names.index(None)
        for name, slot in self.lru.items():
            if self.refs[slot] == 0 and name not in self.pinned:
                self._forget(slot)  # no zeroing: the caller installs over it at once
                self.evictions += 1
                return slot
        return None

    def _install(self, slot: int, lora: LoraWeights) -> None:
        for layer in self.layers:
            layer.install(slot, [lora.a.get(key) for key in layer.keys],
                          [lora.b.get(key) for key in layer.keys],
                          [lora.magnitude.get(key) for key in layer.keys],
                          [lora.ia3.get(key) for key in layer.keys], lora.ia3_inputs)
        if lora.dora or lora.ia3:
            self.batch.scaled_slots.add(slot)
        else:
            self.batch.scaled_slots.discard(slot)
        self.names[slot], self.ranks[slot] = lora.name, lora.rank
        self.versions[slot] = lora.version
        self.lru[lora.name] = slot
        self.installs[slot] += 1

    def _clear(self, slot: int) -> None:
        self._zero(slot)
        self._forget(slot)

    def _zero(self, slot: int) -> None:
        # Zeroing is not needed for correctness (a free slot is never routed to) but keeps
        # an unloaded adapter's weights from lingering in memory.
        for layer in self.layers:
            layer.install(slot, [None] * len(layer.keys), [None] * len(layer.keys))
        self.batch.scaled_slots.discard(slot)
        self.installs[slot] += 1

    def _forget(self, slot: int) -> None:
        del self.lru[self.names[slot]]
        self.names[slot], self.ranks[slot] = None, 0
