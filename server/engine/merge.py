"""dLoRA-style automatic merging: while every running sequence uses one adapter, its delta
is merged into the base weights, so its tokens take the base model's plain matmuls; the
first step with other traffic unmerges it.

A merge costs ~160 ms here (W + BA per targeted projection, q/k/v/o); an unmerge is free.
MERGE_AFTER_STEPS homogeneous steps come before a merge: a little hysteresis against
flapping.
"""

from lorag.server.engine.pool import AdapterPool

MERGE_AFTER_STEPS = 2


class AutoMerge:
    """Which adapter slot, if any, is merged into the base weights now."""

    def __init__(self, lora_layers: list, pool: AdapterPool, enabled: bool):
        self.layers, self.pool, self.enabled = lora_layers, pool, enabled
        self.slot: int | None = None  # the merged slot
        self.install = 0  # that slot's pool.installs when it was merged
        self.homogeneous_steps = 0
        self.merges = self.unmerges = 0

    def route(self, slot: int) -> int:
        """The slot a token of `slot` runs through: none (-1) for the merged adapter's,
        whose delta is in the base weights now."""
        return -1 if slot == self.slot else slot

    def update(self, running_slots: set[int]) -> None:
        """Before a step over sequences on `running_slots`: unmerge on mixed traffic or
        when the merged slot was rewritten; merge an adapter that is all the traffic."""
        if not self.enabled:
            return
        hot = next(iter(running_slots)) if len(running_slots) == 1 else None
        hot = None if hot == -1 else hot
        if self.slot is not None and (
                self.slot != hot or  # mixed traffic, or another adapter's
                self.pool.installs[self.slot] != self.install):  # rewritten
            for layer in self.layers:
                layer.unmerge()
            self.slot = None
            self.unmerges += 1
        self.homogeneous_steps = self.homogeneous_steps + 1 if hot is not None else 0
        if hot is not None and self.slot is None and \
                self.homogeneous_steps >= MERGE_AFTER_STEPS:
            for layer in self.layers:
                layer.merge(hot)
            self.slot, self.install = hot, self.pool.installs[hot]
            self.merges += 1
