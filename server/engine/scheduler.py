"""Which requests run, and how one step's input is laid out from them.

The scheduler holds the queue (`waiting`) and the batch (`running`). A request leaves the
queue for the batch, in order, once an adapter slot (if it uses an adapter) and KV blocks
for everything it can reach are free; its cached prompt prefix is reused (kv.BlockPool).
Each step then lays out one decode token for every decoding sequence, followed by prompt
chunks of sequences being prefilled, up to `max_num_batched_tokens`.
"""

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial

import torch
from xgrammar import GrammarMatcher

from lorag.adapters import AdapterKey, LoraWeights, VirtualTokens
from lorag.errors import LoragError, RequestFailed
from lorag.server.engine.config import EngineConfig
from lorag.server.engine.kv import AttentionInput, BlockPool
from lorag.server.engine.merge import AutoMerge
from lorag.server.engine.pool import AdapterPool
from lorag.server.engine.runner import Prefill, StepInput
from lorag.server.engine.sampling import SamplingParams
from lorag.server.engine.speculative import DraftState
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
    # read at submit when not in a slot; dropped once in (a prompt- or prefix-tuning
    # adapter's stay: it takes no slot)
    weights: LoraWeights | None = None
    matcher: GrammarMatcher | None = None  # the output's grammar state, when constrained
    virtual: VirtualTokens | None = None  # a prompt/prefix-tuning adapter's, before the prompt
    # requests with this one's prompt and adapter (the other choices of an n > 1 request)
    # that wait for its prompt's KV blocks before they are queued
    followers: list["Sequence"] = field(default_factory=list)
    priority: int = 0  # lower is admitted first: interactive 0, batch lines 1
    draft: list[int] = field(default_factory=list)  # this step's drafted tokens, if any
    drafting: DraftState = field(default_factory=DraftState)
    history: Hashable | None = None  # whose recent outputs it may draft from

    @property
    def offset(self) -> int:
        """Positions the adapter's virtual tokens take before the prompt's first token."""
        return 0 if self.virtual is None else self.virtual.count

    @property
    def context_length(self) -> int:
        """Positions before the output: virtual tokens and prompt."""
        return self.offset + len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.context_length

    @property
    def length(self) -> int:
        return self.context_length + len(self.output_ids)

    def context_ids(self, start: int = 0, end: int | None = None) -> list[int]:
        """Token ids of context positions [start, end): virtual token i reads as -1 - i,
        which no real token is (the prefix cache keys blocks by these ids)."""
        offset, end = self.offset, self.context_length if end is None else end
        virtual = list(range(-1 - start, -1 - min(end, offset), -1))
        return virtual + self.prompt_ids[max(start, offset) - offset:max(end - offset, 0)]


class PrefixBlocks:
    """Prefix-tuning adapters' keys and values in the KV cache: each adapter's full blocks
    of virtual tokens, written once (at its first request, or when pinned) and held by
    the adapter, so that every request on it starts from them. Held until the adapter is
    unloaded or its weights change; an idle, unpinned adapter's go back when a request
    needs the blocks (least recently used first) and are written again on its next use.
    The virtual tokens past the last full block are copied into each request's own
    first block (`Scheduler._reserve`): a block a sequence writes into is never shared."""

    def __init__(self, kv: BlockPool, write: Callable[[list[int], torch.Tensor], None]):
        self.kv, self.write = kv, write
        self.held: OrderedDict[str, tuple[str, list[int]]] = OrderedDict()  # name ->
        # (version, blocks), least recently used first
        self.pinned: set[str] = set()

    def blocks(self, name: str, weights: LoraWeights) -> list[int] | None:
        """The blocks holding `name`'s full blocks of virtual KV, written now if they are
        not yet; None when not enough blocks are free."""
        version, blocks = self.held.get(name, (None, None))
        if version == weights.version:
            self.held.move_to_end(name)
            return blocks
        self.drop(name)  # other weights under the name, or none yet
        virtual = weights.virtual
        count = virtual.count // self.kv.block_size
        blocks = self.kv.take(count)
        while blocks is None and self.evict_idle(keep=name):
            blocks = self.kv.take(count)
        if blocks is None:
            return None
        try:
            self.write(blocks, virtual.tensor[:, :, :count * self.kv.block_size])
        except Exception:
            self.kv.release(blocks)
            raise
        self.held[name] = (weights.version, blocks)
        return blocks

    def drop(self, name: str) -> None:
        """Give `name`'s blocks back (the running requests on it keep theirs)."""
        _, blocks = self.held.pop(name, (None, []))
        self.kv.release(blocks)

    def evict_idle(self, keep: str | None = None) -> bool:
        """Drop the least recently used adapter's blocks (other than `keep`'s) that no
        request and no pin holds; says whether there was one."""
        for name, (_, blocks) in self.held.items():
            if name != keep and name not in self.pinned and \
                    all(self.kv.refs[b] == 1 for b in blocks):
                self.drop(name)
                return True
        return False


class Scheduler:
    """The queue and the running batch, over the engine's KV blocks and adapter slots."""

    def __init__(self, config: EngineConfig, pool: AdapterPool, merge: AutoMerge,
                 device: torch.device, write_kv: Callable[[list[int], torch.Tensor], None]):
        self.config, self.pool, self.merge, self.device = config, pool, merge, device
        self.kv = BlockPool(config.kv_blocks, config.kv_block_size,
                            config.enable_prefix_caching)
        self.prefixes = PrefixBlocks(self.kv, write_kv)
        self.write_kv = write_kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def queue(self, seq: Sequence, front: bool = False) -> None:
        """Queue `seq` behind every waiting request of its priority or a lower number
        (with `front`: ahead of those of its own), ahead of the higher numbers."""
        index = next((i for i, other in enumerate(self.waiting)
                      if other.priority > seq.priority
                      or front and other.priority == seq.priority), len(self.waiting))
        self.waiting.insert(index, seq)

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
            if seq.virtual is not None:  # no slot: the base's weights, its tokens first
                version = seq.weights.version
            elif seq.adapter is not None:
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
            failure = None
            try:
                reserved = self._reserve(seq, version)
            except Exception as e:  # writing a prefix adapter's KV: its request alone ends
                log.error("KV blocks could not be prepared for request %s", seq.id,
                          exc_info=e)
                reserved, failure = False, RequestFailed.alone(
                    f"the KV cache could not be prepared for request {seq.id}")
            if not reserved:
                if slot >= 0:
                    self.pool.release(slot)
                if failure is None:
                    break  # not enough KV blocks: wait for a request to finish
                ended.append((self.waiting.popleft(), failure))
                continue
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
        """KV blocks for everything `seq` can reach, its cached prompt prefix reused (and
        a prefix-tuning adapter's virtual KV, which is never computed)."""
        reach = min(seq.context_length + seq.params.max_tokens, self.config.max_model_len)
        context = seq.context_ids()
        hashes = self.kv.hashes(version, context) if self.kv.prefix_caching else []
        prefix = seq.virtual is not None and seq.virtual.kind == "prefix"
        held = self.prefixes.blocks(seq.adapter, seq.weights) if prefix else []
        if held is None:
            return False
        blocks = self.config.blocks_for(reach)
        got = self.kv.allocate(context, hashes, blocks, held)
        while got is None and self.prefixes.evict_idle(keep=seq.adapter):
            got = self.kv.allocate(context, hashes, blocks, held)
        if got is None:
            return False
        seq.blocks, seq.computed = got
        seq.hashes = hashes
        if prefix and seq.computed < seq.offset:  # the virtual tokens past the held blocks
            size = self.config.kv_block_size
            try:
                self.write_kv(seq.blocks[len(held):len(held) + 1],
                              seq.virtual.tensor[:, :, len(held) * size:])
            except Exception:
                self.kv.release(seq.blocks)
                raise
            seq.computed = seq.offset
        return True

    def stepping(self) -> list[Sequence]:
        """The running sequences this step runs: all of them, but while a request of the
        highest priority running prefills, only those of that priority (a batch line's
        decode waits a step or a few, so that an interactive request's first token comes as
        soon as it would without the batch)."""
        seqs = list(self.running)
        first = min(seq.priority for seq in seqs)
        if any(seq.priority > first for seq in seqs) and \
                any(seq.priority == first and seq.prefilling for seq in seqs):
            return [seq for seq in seqs if seq.priority == first]
        return seqs

    def schedule(self, seqs: list[Sequence]) -> tuple[StepInput, list[Sequence],
                                                      list[Sequence]]:
        """A step over `seqs` (running sequences): its input, the sequences it samples, and
        those it prefills (their `computed` already advanced by their chunk)."""
        budget = self.config.max_num_batched_tokens
        # one token each, first in the step; a drafted sequence runs as a chunk below
        decodes = [s for s in seqs if not s.prefilling and not s.draft]
        drafted = [s for s in seqs if not s.prefilling and s.draft]
        budget -= len(decodes) + len(drafted)
        ids = [s.output_ids[-1] for s in decodes]  # ids: [tokens], the step's input
        positions = [s.length - 1 for s in decodes]  # positions: [tokens]
        lora = [self._route(s) for s in decodes]  # lora: [tokens], slot (-1: none/merged)
        q_starts = list(range(len(decodes) + 1))  # q_starts: [seqs + 1], offsets into ids
        seq_lens = [s.length for s in decodes]  # seq_lens: [seqs], after this step
        tables = [s.blocks for s in decodes]  # tables: [seqs], each one's KV blocks
        sampled = list(decodes)  # sampled: [samples], the sequences that get a token
        sample_at = list(range(len(decodes)))  # sample_at: [samples], their row in ids
        prefills, prefilled = [], []  # every chunk (drafted ones first); the prompts' seqs
        embeds = []  # (row in ids, [n, hidden]): virtual tokens' embeddings

        def add_chunk(seq: Sequence, start: int, tokens: list[int], slot: int) -> range:
            """`seq`'s `tokens` from position `start` on as one chunk; their rows in ids."""
            rows = range(len(ids), len(ids) + len(tokens))
            prefills.append(Prefill(start, len(tokens), slot))
            ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
            lora.extend([slot] * len(tokens))
            q_starts.append(len(ids))
            seq_lens.append(start + len(tokens))
            tables.append(seq.blocks)
            return rows

        for seq in drafted:  # its last token and drafts: a chunk sampled at every row
            if len(seq.draft) > budget:
                seq.draft = seq.draft[:max(budget, 0)]
            budget -= len(seq.draft)
            rows = add_chunk(seq, seq.length - 1, [seq.output_ids[-1], *seq.draft],
                             self._route(seq))
            sample_at += rows
            sampled += [seq] * len(rows)
        for seq in seqs:
            if not seq.prefilling or budget <= 0:
                continue
            n = min(seq.context_length - seq.computed, budget)  # this step's chunk
            budget -= n
            chunk = seq.context_ids(seq.computed, seq.computed + n)
            if seq.computed < seq.offset:  # a prompt-tuning adapter's virtual tokens
                embeds.append((len(ids), seq.virtual.tensor[seq.computed:seq.offset]
                               [:n]))
                chunk = [max(token, 0) for token in chunk]
            rows = add_chunk(seq, seq.computed, chunk, self._route(seq))
            prefilled.append(seq)
            seq.computed += n
            if not seq.prefilling:  # its last prompt token yields the first output token
                sampled.append(seq)
                sample_at.append(rows[-1])
        used = [self.pool.ranks[slot] for slot in set(lora) if slot >= 0]
        tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        attention = AttentionInput(q_starts, seq_lens, tables, self.config.kv_block_size,
                                   len(decodes), self.device)
        # the samples whose log-probabilities are reported get float32 logits
        precise = [row for row, seq in enumerate(sampled) if seq.params.logprobs is not None]
        step = StepInput(tensor(ids), tensor(positions), tensor(lora), len(decodes), prefills,
                         attention, tensor(sample_at), max(used, default=0), tensor(precise),
                         embeds)
        return step, sampled, prefilled

    def _route(self, seq: Sequence) -> int:
        return self.merge.route(seq.lora_slot)


def distinct_adapters(sequences: list[Sequence]) -> list[AdapterKey]:
    """The adapters `sequences` run on, each once, in order of first appearance."""
    return list(dict.fromkeys(seq.adapter for seq in sequences if seq.adapter is not None))
