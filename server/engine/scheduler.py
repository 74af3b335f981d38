"""Which requests run, and how one step's input is laid out from them.

The scheduler holds the queue (`waiting`) and the batch (`running`). A request leaves the
queue for the batch, in order, once an adapter slot (if it uses an adapter) and KV blocks
for everything it can reach are free; its cached prompt prefix is reused (kv.BlockPool).
Each step then lays out one decode token for every decoding sequence, followed by prompt
chunks of sequences being prefilled, up to `max_num_batched_tokens`.
"""

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from xgrammar import GrammarMatcher

from lorag.adapters import AdapterKey, LoraWeights
from lorag.errors import LoragError, RequestFailed
from lorag.server.engine.config import EngineConfig
from lorag.server.engine.kv import AttentionInput, BlockPool
from lorag.server.engine.merge import AutoMerge
from lorag.server.engine.pool import AdapterPool
from lorag.server.engine.runner import Prefill, StepInput
from lorag.server.engine.sampling import SamplingParams
from lorag.server.engine.stream import TokenStream

log = logging.getLogger(__name__)


@dataclass(eq=False)  # a request is itself: compared (`in running`) by identity
class Sequence:
    """A request inside the engine: its tokens, its slots and how much is computed."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterKey | None  # the pool's key: an adapter name or a composition
    stream: TokenStream
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # the KV block table
    hashes: list[bytes] = field(default_factory=list)  # its full prompt blocks' chain hashes
    lora_slot: int = -1
    computed: int = 0  # prompt tokens already in the KV cache
    sent: int = 0  # characters of output text already streamed
    cancelled: bool = False
    weights: LoraWeights | None = None  # read at submit when not in a slot; dropped once in
    matcher: GrammarMatcher | None = None  # the output's grammar state, when constrained

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt_ids)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class Scheduler:
    """The queue and the running batch, over the engine's KV blocks and adapter slots."""

    def __init__(self, config: EngineConfig, pool: AdapterPool, merge: AutoMerge,
                 device: torch.device):
        self.config, self.pool, self.merge, self.device = config, pool, merge, device
        self.kv = BlockPool(config.kv_blocks, config.kv_block_size,
                            config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def admit(self, weights: Callable[[Sequence], LoraWeights]
              ) -> list[tuple[Sequence, LoragError | None]]:
        """Move waiting sequences into the batch while slots and blocks allow. Returns
        those that leave the queue without running, for the engine to end: cancelled
        (None) or refused by the adapter pool (unloaded since submit, a composition too
        wide). `weights(seq)` reads the adapter weights of a sequence entering a slot."""
        ended = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.cancelled:
                ended.append((self.waiting.popleft(), None))
                continue
            version, slot = "base", -1
            if seq.adapter is not None:
                try:
                    slot = self.pool.acquire(seq.adapter, partial(weights, seq))
                except LoragError as e:
                    ended.append((self.waiting.popleft(), e))
                    continue
                except Exception as e:  # a bug or a bad file behind one adapter: its
                    # request alone ends; the others and the loop go on
                    log.error("adapter %s could not be installed for request %s",
                              seq.adapter, seq.id, exc_info=e)
                    ended.append((self.waiting.popleft(), RequestFailed.alone(
                        f"adapter {str(seq.adapter)!r} could not be put in a compute slot "
                        f"for request {seq.id}")))
                    continue
                if slot is None:
                    break  # every adapter slot is in use: wait for a release
                version = self.pool.versions[slot]
            if not self._reserve(seq, version):
                if slot >= 0:
                    self.pool.release(slot)
                break  # not enough KV blocks: wait for a request to finish
            if slot >= 0:
                seq.lora_slot, seq.weights = slot, None
            self.running.append(self.waiting.popleft())
        return ended

    def release(self, seq: Sequence) -> None:
        """`seq` is done: its KV blocks and adapter slot go back, if it was running."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv.release(seq.blocks)
            if seq.lora_slot >= 0:
                self.pool.release(seq.lora_slot)

    def _reserve(self, seq: Sequence, version: str) -> bool:
        """KV blocks for everything `seq` can reach, its cached prompt prefix reused."""
        reach = min(len(seq.prompt_ids) + seq.params.max_tokens, self.config.max_model_len)
        hashes = self.kv.hashes(version, seq.prompt_ids) if self.kv.prefix_caching else []
        got = self.kv.allocate(seq.prompt_ids, hashes, self.config.blocks_for(reach))
        if got is None:
            return False
        seq.blocks, seq.computed = got
        seq.hashes = hashes
        return True

    def schedule(self, seqs: list[Sequence]) -> tuple[StepInput, list[Sequence],
                                                      list[Sequence]]:
        """A step over `seqs` (running sequences): its input, the sequences it samples, and
        those it prefills (their `computed` already advanced by their chunk)."""
        budget = self.config.max_num_batched_tokens
        decodes = [s for s in seqs if not s.prefilling]  # one token each, first in the step
        budget -= len(decodes)
        ids = [s.output_ids[-1] for s in decodes]  # ids: [tokens], the step's input
        positions = [s.length - 1 for s in decodes]  # positions: [tokens]
        lora = [self._route(s) for s in decodes]  # lora: [tokens], slot (-1: none/merged)
        q_starts = list(range(len(decodes) + 1))  # q_starts: [seqs + 1], offsets into ids
        seq_lens = [s.length for s in decodes]  # seq_lens: [seqs], after this step
        tables = [s.blocks for s in decodes]  # tables: [seqs], each one's KV blocks
        sampled = list(decodes)  # sampled: [samples], the sequences that get a token
        sample_at = list(range(len(decodes)))  # sample_at: [samples], their row in ids
        prefills, prefilled = [], []  # [prefilling seqs]: each one's chunk; the seqs
        for seq in seqs:
            if not seq.prefilling or budget <= 0:
                continue
            n = min(len(seq.prompt_ids) - seq.computed, budget)  # this step's chunk
            budget -= n
            slot = self._route(seq)
            prefills.append(Prefill(seq.computed, n, slot))
            prefilled.append(seq)
            ids += seq.prompt_ids[seq.computed:seq.computed + n]
            positions += range(seq.computed, seq.computed + n)
            lora += [slot] * n
            seq.computed += n
            q_starts.append(len(ids))
            seq_lens.append(seq.computed)
            tables.append(seq.blocks)
            if not seq.prefilling:  # its last prompt token yields the first output token
                sampled.append(seq)
                sample_at.append(len(ids) - 1)
        used = [self.pool.ranks[slot] for slot in set(lora) if slot >= 0]
        tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        attention = AttentionInput(q_starts, seq_lens, tables, self.config.kv_block_size,
                                   len(decodes), self.device)
        # the samples whose log-probabilities are reported get float32 logits
        precise = [row for row, seq in enumerate(sampled) if seq.params.logprobs is not None]
        step = StepInput(tensor(ids), tensor(positions), tensor(lora), len(decodes), prefills,
                         attention, tensor(sample_at), max(used, default=0), tensor(precise))
        return step, sampled, prefilled

    def _route(self, seq: Sequence) -> int:
        return self.merge.route(seq.lora_slot)


def distinct_adapters(sequences: list[Sequence]) -> list[AdapterKey]:
    """The adapters `sequences` run on, each once, in order of first appearance."""
    return list(dict.fromkeys(seq.adapter for seq in sequences if seq.adapter is not None))
