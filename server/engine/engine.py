"""The engine: a step loop with continuous batching over one base model and many adapters.

Requests join the running batch whenever KV-cache blocks for them (and, for an adapter,
an adapter slot) are free, and leave it the step they finish; a prompt whose first
blocks another request already computed, under the same adapter weights, starts after
them (prefix caching, server/engine/kv.py). Each step mixes one decode token per running
sequence with prompt chunks of newly admitted ones, up to `max_num_batched_tokens` (the
scheduler, server/engine/scheduler.py). The loop runs in its own thread; callers talk to
it through `submit` (returns a TokenStream), `cancel`, and the adapter operations. Work that must
not race a step (slot changes) is queued and run between steps.
"""

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future

import torch
from prometheus_client.core import GaugeMetricFamily

from lorag.adapters import AdapterKey, Composition, LoraWeights, compose
from lorag.errors import (
    AdapterNotFound,
    InvalidRequest,
    Overloaded,
    RequestFailed,
    Unavailable,
)
from lorag.openmp import release_openmp_pool
from lorag.server.engine.config import EngineConfig, Limits, kv_bytes_per_token
from lorag.server.engine.kv import BlockPool
from lorag.server.engine.merge import AutoMerge
from lorag.server.engine.pool import AdapterPool
from lorag.server.engine.registry import AdapterRegistry
from lorag.server.engine.runner import ModelRunner, StepInput
from lorag.server.engine.sampling import Logprobs, SamplingParams, penalize, sample
from lorag.server.engine.scheduler import Scheduler, Sequence, distinct_adapters
from lorag.server.engine.speculative import Speculator, speculable, verify
from lorag.server.engine.stream import Output, TokenLogprob, TokenStream, releasable
from lorag.server.engine.structured import Grammars, grammar_prefix, mask_drafted, mask_logits

log = logging.getLogger("lorag.engine")
STOPPED = ("the engine stopped after an internal error (the daemon's log has it); this "
           "replica serves no requests until it is restarted")


class Engine:
    """Serves one base model with many LoRA adapters, continuously batched."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        config = config or EngineConfig()
        dtype = model.model.embed_tokens.weight.dtype
        self.config = config.sized(kv_bytes_per_token(model.config, dtype))
        if self.config.max_num_batched_tokens < self.config.max_num_seqs:
            raise InvalidRequest("max_num_batched_tokens must be >= max_num_seqs (every "
                                 "running sequence decodes one token per step)",
                                 field="max_num_batched_tokens")
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, self.config)
        self.registry = AdapterRegistry(self.runner.shape, self.config.adapter_roots,
                                        self.config.max_lora_rank,
                                        self.config.max_cpu_adapter_bytes, self.runner.dtype)
        self.pool = AdapterPool(self.runner.lora_layers, self.config.max_active_adapters,
                                 self.runner.lora_batch)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.grammars = Grammars(tokenizer, model.config.vocab_size, self.eos_ids,
                                 compile_s=self.config.grammar_compile_s)
        self.bitmask = self.grammars.bitmask(self.config.max_num_seqs)  # one row per sample
        # a drafted sequence's verify rows
        self.draft_bitmask = self.grammars.bitmask(self.config.speculative_tokens + 1)
        self.by_id: dict[str, Sequence] = {}
        self.control: deque[tuple] = deque()  # (fn, args, Future) run between steps
        self.wakeup = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.failure: BaseException | None = None  # what killed the step loop, if it died
        # tests only: called after each forward pass with the sampled sequences and their
        # logits [rows, vocab]; it may raise or poison rows, as a broken kernel would
        self.fault_hook: Callable[[list[Sequence], torch.Tensor], None] | None = None
        self.merge = AutoMerge(self.runner.lora_layers, self.pool,
                               self.config.auto_merge and not self.runner.quantized)
        self.scheduler = Scheduler(self.config, self.pool, self.merge, self.runner.device,
                                   self.runner.write_kv)
        self.ids = itertools.count()
        self.counters = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0}
        self.speculator = Speculator(self.config.speculative_tokens)

    # ---- lifecycle ----

    def start(self) -> "Engine":
        """Start the step loop thread, with the intra-op threads torch has here: OpenMP
        keeps the thread count per thread, so `torch.set_num_threads(n)` in the caller
        would not reach the loop, which would use every core (measured: after
        set_num_threads(1), a matmul ran 1.8x faster in a new thread than in the main
        one). The caller's own OpenMP workers are released, or libgomp would throttle
        the loop's (lorag/openmp.py)."""
        threads = torch.get_num_threads()
        release_openmp_pool()
        self.thread = threading.Thread(target=self._loop, args=(threads,), name="lorag-engine",
                                       daemon=True)
        self.thread.start()
        return self

    # the scheduler's KV blocks, queue and batch, read here too
    @property
    def kv(self) -> BlockPool:
        return self.scheduler.kv

    @property
    def waiting(self) -> deque[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def alive(self) -> bool:
        """Whether the step loop is running."""
        return self.thread is not None and self.thread.is_alive()

    def __enter__(self) -> "Engine":
        """`with Engine(...) as engine:` runs the loop for the block and stops it however
        the block ends: an exception in the owner must not leave a thread stepping."""
        return self if self.alive else self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the loop; requests still running end with finish_reason 'cancelled'.
        Safe to call more than once."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()
        for seq in list(self.running):  # their followers join the queue, ended next
            self._finish(seq, "cancelled")
        while self.waiting:
            self._finish(self.waiting.popleft(), "cancelled")

    # ---- requests ----

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               adapter: AdapterKey | None = None, request_id: str | None = None,
               after: str | None = None, priority: int = 0,
               history: Hashable | None = None) -> TokenStream:
        """Queue a request; read its outputs from the returned stream.

        prompt: text (tokenized as is: apply a chat template first) or token ids.
        adapter: an adapter's name, or a weighted Composition of several; None for the base.
        after: the id of a request just submitted with the same prompt and adapter (the
        first choice of an n > 1 request): with prefix caching on, this one is queued once
        that one's prompt is in the KV cache, and starts from its blocks (only the last,
        partial block is computed again); queued at once if that one is gone.
        priority: lower numbers are admitted first (interactive requests 0, a batch's
        lines 1); FIFO within one.
        history: with speculation on, requests of one history key draft from each other's
        outputs (server/engine/speculative.py); None: from their own context only.
        Raises InvalidRequest (a constraint that does not compile among others),
        AdapterNotFound, Overloaded when the queue is full, or Unavailable after shutdown.
        """
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        key = self._check_adapter(adapter)
        request_id = request_id or f"req-{next(self.ids)}"
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        seq = Sequence(request_id, ids, params, key, TokenStream(request_id), generator,
                       priority=priority, history=history)
        if key is not None and self.pool.slot_of(key) is None:
            seq.weights = self._weights(seq)  # disk read and validation here, not on the loop
            seq.virtual = seq.weights.virtual
        self.limits.check_prompt(ids, params.max_tokens, seq.offset)
        if params.constraint is not None:  # compiled here (or found cached), not on the loop
            seq.matcher = self.grammars.matcher(params.constraint)
        with self.wakeup:
            if self.failure is not None:
                raise Unavailable(STOPPED)
            if self.stopping:
                raise Unavailable("the engine is shut down and takes no new requests")
            if len(self.waiting) >= self.config.max_waiting:
                raise Overloaded(f"the engine's queue is full ({self.config.max_waiting} "
                                 "requests waiting); retry later")
            if request_id in self.by_id:
                raise InvalidRequest(f"request id {request_id!r} is already in use",
                                     field="request_id")
            self.by_id[request_id] = seq
            leader = self.by_id.get(after) if after is not None else None
            if leader is not None and leader.prompt_ids == ids and leader.adapter == key \
                    and self.kv.prefix_caching and leader.prefilling:
                leader.followers.append(seq)
            else:
                self.scheduler.queue(seq)
            self.wakeup.notify()
        return seq.stream

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None,
                 adapters: list[AdapterKey | None] | None = None) -> list[Output]:
        """Submit many requests at once and wait for all (a convenience for scripts)."""
        names = adapters or [None] * len(prompts)
        streams = [self.submit(p, params, adapter=a) for p, a in zip(prompts, names, strict=True)]
        return [stream.result() for stream in streams]

    def cancel(self, request_id: str) -> bool:
        """Cancel a request; its KV cache and adapter slot are freed at the next step.
        Says whether it stopped something (False: unknown, finished or already cancelled)."""
        with self.wakeup:
            seq = self.by_id.get(request_id)
            if seq is None or seq.cancelled:
                return False
            seq.cancelled = True
            self.wakeup.notify()
            return True

    # ---- adapters ----

    def load_adapter(self, name: str, path: str, lazy: bool = False,
                     version: str | None = None) -> bool:
        """Register (read + validate) an adapter; True if new, False if already loaded.

        Runs in the caller's thread, never on the step loop. The adapter enters a slot
        between steps when a request first uses it. lazy: only record the path (restoring
        a registry); the file is read and validated on first use. version: the files'
        content_version, which every read must find (AdapterRegistry).
        """
        if lazy:
            self.registry.remember(name, path, version)
            return True
        return self.registry.register(name, path, version)

    def unload_adapter(self, name: str) -> bool:
        """Forget an adapter. Running requests that use it finish; new ones get a 404."""
        if not self.registry.unregister(name):
            raise AdapterNotFound.named(name)
        self._between_steps(self._discard, name)
        return True

    def pin_adapter(self, name: str) -> int | None:
        """Keep an adapter in a compute slot until unpinned; returns its slot. A prefix-
        tuning adapter takes no slot: its KV blocks are written now and kept (None); a
        prompt-tuning one has nothing outside RAM to keep (None)."""
        if name not in self.registry:
            raise AdapterNotFound.named(name)
        weights = self.registry.get(name)
        if weights.virtual is not None:
            return self._between_steps(self._pin_virtual, name, weights)
        return self._between_steps(self.pool.pin, name, lambda: weights)

    def unpin_adapter(self, name: str) -> bool:
        """Let a pinned adapter be evicted again; says whether it was pinned."""
        return self._between_steps(self._unpin, name)

    def list_adapters(self) -> list[dict]:
        """Every registered adapter with where it is: RAM tier, slot, pinned, in use."""
        rows = []
        for name in self.registry.names():
            slot = self.pool.slot_of(name)
            rows.append({"name": name, "path": str(self.registry.path(name) or ""),
                         "in_ram": self.registry.in_ram(name),
                         "active": slot is not None or name in self.scheduler.prefixes.held,
                         "slot": slot,
                         "pinned": name in self.pool.pinned
                         or name in self.scheduler.prefixes.pinned,
                         "running_requests": self.pool.refs[slot] if slot is not None else 0})
        return rows

    @property
    def limits(self) -> Limits:
        """The sizes requests and adapters must fit."""
        c = self.config
        return Limits(c.max_model_len, c.max_lora_rank, c.max_active_adapters,
                      tuple(c.adapter_roots), self.runner.vocab_size)

    def describe(self) -> str:
        """For the start-up banner."""
        c = self.config
        caching = "on" if c.enable_prefix_caching else "off"
        kv = self.runner.kv_cache
        return (f"native engine on {self.runner.device}, {self.runner.dtype}, "
                f"{self.runner.attention.name} attention, prefix caching {caching}, KV cache "
                f"{kv.numel() * kv.element_size() / 2**20:.1f} MiB ({c.kv_blocks} blocks: "
                f"{c.kv_blocks * c.kv_block_size} tokens, "
                f"{c.kv_blocks / c.blocks_for(c.max_model_len):.1f} sequences of "
                f"{c.max_model_len})")

    def occupancy(self) -> dict:
        """Queue and occupancy (the backend interface's `Occupancy`); KV usage is the
        share of blocks held by running requests (cached idle blocks count as free).
        Read from other threads: copies of the lists, never the lists being stepped."""
        running, waiting = list(self.running), list(self.waiting)
        return {"running": len(running), "waiting": len(waiting),
                "kv_slots_free": self.config.max_num_seqs - len(running),
                "kv_cache_usage": self.kv.used / self.kv.num_blocks,
                "evictions": self.pool.evictions, "slot_loads": sum(self.pool.installs),
                "prefix_cache_queries": self.kv.queries, "prefix_cache_hits": self.kv.hits,
                "running_adapters": distinct_adapters(running),
                "waiting_adapters": distinct_adapters(waiting)}

    def metric_families(self) -> list:
        """The compiled-grammar cache's size (bounded, LRU) and, with speculation on, its
        counts under vLLM's names; lorag's other metrics are this engine's."""
        cache = GaugeMetricFamily("lorag_grammar_cache_bytes",
                                  "Bytes of compiled grammars the engine keeps (LRU).",
                                  value=self.grammars.cache_bytes())
        return [cache, *(self.speculator.families() if self.speculator.tokens else [])]

    def stats(self) -> dict:
        """Occupancy plus the step counters, slot map and merge state: for benchmarks and
        tests."""
        merged = self.merge.slot
        return {**self.counters, "merges": self.merge.merges, "unmerges": self.merge.unmerges,
                **self.occupancy(), "adapter_slots": self.pool.slot_map(),
                "adapter_refs": list(self.pool.refs),
                "merged_adapter": None if merged is None else str(self.pool.names[merged])}

    # ---- the step loop ----

    def _loop(self, threads: int) -> None:
        torch.set_num_threads(threads)
        try:
            while True:
                with self.wakeup:
                    while not (self.stopping or self.waiting or self.running or self.control):
                        self.wakeup.wait()
                    if self.stopping:
                        return
                self.step()
        except BaseException as e:  # a bug outside any one request's rows: the loop is gone
            log.critical("the engine's step loop died; every request ends with an error",
                         exc_info=e)
            self._die(e)

    def _die(self, failure: BaseException) -> None:
        """After the loop died: refuse new work, and end every request and every caller
        waiting on the loop with an error at once (never a hang). The engine's bookkeeping
        may be half-updated, so streams are told directly."""
        error = Unavailable(STOPPED)
        with self.wakeup:
            self.failure, self.stopping = failure, True
            seqs = [*self.running, *self.waiting, *self.by_id.values()]
            self.running.clear()
            self.waiting.clear()
            self.by_id = {}
            control, self.control = list(self.control), deque()
        for seq in dict.fromkeys(seqs):
            seq.stream.put(Output("", [], "error", len(seq.prompt_ids), len(seq.output_ids),
                                  error))
        for _, _, future in control:
            future.set_exception(error)

    def step(self) -> None:
        """One scheduling round and forward pass. Public so tests can drive it by hand."""
        while self.control:
            fn, args, future = self.control.popleft()
            try:
                future.set_result(fn(*args))
            except Exception as e:  # handed to the waiting caller
                future.set_exception(e)
        for seq in [s for s in self.running if s.cancelled]:
            self._finish(seq, "cancelled")
        for seq, error in self.scheduler.admit(self._weights):
            self._finish(seq, "cancelled" if error is None else "error", error)
        if not self.running:
            return
        self._update_merge()
        seqs = self.scheduler.stepping()
        self._draft(seqs)
        self._run(seqs)

    def _draft(self, seqs: list[Sequence]) -> None:
        """Each decoding sequence's drafts for this step (server/engine/speculative.py)."""
        if not self.speculator.tokens:
            return
        decoding = [seq for seq in seqs if not seq.prefilling]
        for seq in decoding:
            seq.draft = []
            if speculable(seq.params, seq.virtual is not None):
                room = min(seq.params.max_tokens - len(seq.output_ids),
                           self.config.max_model_len - seq.length) - 1
                seq.draft = self.speculator.draft(
                    seq.drafting, lambda seq=seq: seq.context_ids() + seq.output_ids, room,
                    len(decoding), seq.history)
                if seq.draft and seq.matcher is not None:
                    seq.draft = grammar_prefix(seq.matcher, seq.draft)

    def _run(self, seqs: list[Sequence]) -> None:
        """Step `seqs` together, keeping a failure to the request that caused it.

        Validation at submit should refuse every input that can break a step; this is the
        defence behind it. If the forward pass or sampling raises, the step is undone (its
        prompt progress and seeded generators rewound; KV rows written again are the same
        values) and each half of `seqs` runs again on its own, down to the one request whose
        row raises, which alone ends with an error. A row whose logits are not finite ends
        the same way without a rerun: rows of a batch do not mix, so the others are sound.
        """
        step, sampled, prefilled = self.scheduler.schedule(seqs)
        prompt_chunks = step.prefills[len(step.prefills) - len(prefilled):]  # after drafts'
        generators = [(seq.generator, seq.generator.get_state())
                      for seq in dict.fromkeys(sampled) if seq.generator is not None]
        try:
            broken, sampled, tokens, logprobs = self._compute(step, sampled)
        except Exception as e:
            for seq, chunk in zip(prefilled, prompt_chunks, strict=True):
                seq.computed -= chunk.length
            for generator, state in generators:
                generator.set_state(state)
            if len(seqs) == 1:
                self._fail(seqs[0], "its step raised", e)
                return
            self._run(seqs[:len(seqs) // 2])
            self._run(seqs[len(seqs) // 2:])
            return
        for seq in broken:
            self._fail(seq, "its row of the step gave non-finite logits", None)
        for seq in prefilled:  # their KV is written: full prompt blocks become reusable
            if seq not in broken:
                self.kv.computed(seq.blocks, seq.hashes,
                                 seq.computed // self.config.kv_block_size)
                if not seq.prefilling:
                    self._queue_followers(seq)
        self.counters["steps"] += 1
        self.counters["prompt_tokens"] += sum(chunk.length for chunk in prompt_chunks)
        for seq, token, logprob in zip(sampled, tokens, logprobs, strict=True):
            if seq.draft:  # a drafted sequence's tokens: accepted drafts, then one more
                accepted = len(token) - 1
                self.speculator.record(seq.drafting, len(seq.draft), accepted)
                seq.draft = []
            for one in token if isinstance(token, list) else [token]:
                try:
                    self._append(seq, one, logprob)
                except Exception as e:  # decoding or the grammar: this request's own
                    self._fail(seq, "its output could not be decoded", e)
                if seq.id not in self.by_id:  # finished: the rest is not its output
                    break

    def _compute(self, step: StepInput, sampled: list[Sequence]):
        """The forward pass and sampling: (those whose logits were not finite and were left
        out, the sequences sampled, their tokens, their logprobs)."""
        logits = self.runner.forward(step)
        if self.fault_hook is not None:
            self.fault_hook(sampled, logits)
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        broken = list(dict.fromkeys(seq for seq, ok in zip(sampled, finite, strict=True)
                                    if not ok))
        if broken:  # every row of a drafted sequence goes with it
            keep = [seq not in broken for seq in sampled]
            logits = logits[torch.tensor(keep, device=logits.device)]
            sampled = [seq for seq in sampled if seq not in broken]
        if not any(seq.draft for seq in sampled):
            return broken, sampled, *self._sample(logits, sampled)
        return broken, *self._verify(logits, sampled)

    def _verify(self, logits: torch.Tensor, sampled: list[Sequence]):
        """`_sample` for a step with drafted sequences, whose rows (one per draft, and
        one after them) are verified together: (each sequence once, its token or for a
        drafted one its list of tokens, logprobs)."""
        rows: dict[Sequence, list[int]] = {}
        for row, seq in enumerate(sampled):
            rows.setdefault(seq, []).append(row)
        plain = [seq for seq in rows if not seq.draft]
        tokens, logprobs = self._sample(logits[[rows[seq][0] for seq in plain]], plain)
        picked = dict(zip(plain, zip(tokens, logprobs, strict=True), strict=True))
        for seq in rows:
            if seq.draft:
                drafted = logits[rows[seq]]
                if seq.matcher is not None:
                    mask_drafted(drafted, self.draft_bitmask, seq.matcher, seq.draft)
                picked[seq] = (verify(drafted, seq.draft, seq.params, seq.generator), None)
        order = list(rows)
        return order, [picked[seq][0] for seq in order], [picked[seq][1] for seq in order]

    def _fail(self, seq: Sequence, what: str, cause: Exception | None) -> None:
        """End `seq` alone with an error that names the request and nothing internal;
        the log has the cause."""
        log.error("request %s failed: %s", seq.id, what, exc_info=cause)
        self._finish(seq, "error", RequestFailed.alone(
            f"the engine could not compute request {seq.id}: {what}"))

    @torch.inference_mode()
    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]
                ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each row's next token from `logits` [rows, vocab]: the grammar masks first (a
        constrained row only), then the logprobs are read, then penalties and sampling."""
        mask_logits(logits, self.bitmask, [seq.matcher for seq in seqs])
        params = [seq.params for seq in seqs]
        logprobs = Logprobs(logits, params)
        penalize(logits, params, [(seq.prompt_ids, seq.output_ids) for seq in seqs])
        tokens = sample(logits, params, [seq.generator for seq in seqs])
        return tokens, [logprobs.of(row, token) for row, token in enumerate(tokens)]

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        seq.output_ids.append(token)
        self.counters["generated_tokens"] += 1
        if seq.matcher is not None:
            seq.matcher.accept_token(token)
        reason = None
        if token in self.eos_ids and not seq.params.ignore_eos or \
                seq.matcher is not None and seq.matcher.is_terminated():
            reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens or \
                seq.length >= self.config.max_model_len:
            reason = "length"
        text, hit_stop = self._new_text(seq, final=reason is not None)
        if hit_stop:
            reason = "stop"
        logprobs = None if logprob is None else [logprob]
        if reason is None:
            seq.stream.put(Output(text, [token], logprobs=logprobs))
        else:
            if self.speculator.tokens and seq.history is not None:
                self.speculator.history.remember(seq.history, seq.prompt_ids, seq.output_ids)
            self._finish(seq, reason, text=text, last=[token], logprobs=logprobs)

    def _new_text(self, seq: Sequence, final: bool) -> tuple[str, bool]:
        """The output text not yet streamed, and whether a stop string hit."""
        full = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        text, seq.sent, hit = releasable(full, seq.sent, seq.params.stop, final)
        return text, hit

    def _queue_followers(self, seq: Sequence) -> None:
        """`seq`'s prompt is cached (or it ended): the requests that waited for it go to
        the front of their priority's queue, in the order they came."""
        with self.wakeup:
            for follower in reversed(seq.followers):
                self.scheduler.queue(follower, front=True)
            seq.followers = []

    def _finish(self, seq: Sequence, reason: str, error: Exception | None = None,
                text: str = "", last: list[int] | None = None,
                logprobs: list[TokenLogprob] | None = None) -> None:
        self._queue_followers(seq)
        self.scheduler.release(seq)
        with self.wakeup:
            self.by_id.pop(seq.id, None)
        seq.stream.put(Output(text, last or [], reason, len(seq.prompt_ids),
                              len(seq.output_ids), error, logprobs))

    # ---- adapters, on the step loop ----

    def _weights(self, seq: Sequence) -> LoraWeights:
        if seq.weights is not None:
            return seq.weights
        if not isinstance(seq.adapter, Composition):
            return self.registry.get(seq.adapter)
        loras = [(self.registry.get(name), weight) for name, weight in seq.adapter.parts]
        return compose(seq.adapter, loras, self.config.max_lora_rank)

    def _discard(self, name: str) -> None:
        # the adapter and every composition that includes it; a prefix adapter's KV
        for key in list(self.pool.lru):
            if key == name or isinstance(key, Composition) and name in key.names:
                self.pool.discard(key)
        self.scheduler.prefixes.drop(name)
        self.scheduler.prefixes.pinned.discard(name)

    def _pin_virtual(self, name: str, weights: LoraWeights) -> None:
        """A prefix adapter's blocks written and kept; pins may hold all but the blocks
        of one max_model_len sequence (else a request could wait for blocks forever)."""
        prefixes, config = self.scheduler.prefixes, self.config
        if weights.virtual.kind == "prefix":
            needed = weights.virtual.count // config.kv_block_size
            pinned = sum(len(prefixes.held[other][1]) for other in prefixes.pinned - {name}
                         if other in prefixes.held)
            spare = config.kv_blocks - config.blocks_for(config.max_model_len) - pinned
            if needed > spare:
                raise InvalidRequest(
                    f"cannot pin {name!r}: its prefix takes {needed} KV blocks and pins may "
                    f"hold {spare} more (the blocks of one {config.max_model_len}-token "
                    "sequence stay free); unpin another prefix adapter or raise "
                    "num_kv_blocks", field="name")
            if prefixes.blocks(name, weights) is None:
                raise Overloaded(f"cannot pin {name!r}: the KV cache has no {needed} free "
                                 "blocks for its prefix now; retry later")
        prefixes.pinned.add(name)

    def _unpin(self, name: str) -> bool:
        virtual = name in self.scheduler.prefixes.pinned
        self.scheduler.prefixes.pinned.discard(name)
        return self.pool.unpin(name) or virtual

    def _update_merge(self) -> None:
        self.merge.update({s.lora_slot for s in self.running})

    def _between_steps(self, fn, *args):
        """Run `fn(*args)` on the step loop between two steps and return its result."""
        future: Future = Future()
        with self.wakeup:
            dead, running = self.failure is not None, self.alive
            if running and not dead:
                self.control.append((fn, args, future))
                self.wakeup.notify()
        if dead:
            raise Unavailable(STOPPED)
        return future.result() if running else fn(*args)

    # ---- validation ----

    def _check_adapter(self, adapter: AdapterKey | None) -> AdapterKey | None:
        """Every adapter the request names is registered; a composition of one adapter at
        weight 1 is that adapter (and shares its slot)."""
        if isinstance(adapter, Composition):
            for name in adapter.names:
                if name not in self.registry:
                    raise AdapterNotFound.named(name, "adapter")
            return adapter.simplest()
        elif adapter is not None and adapter not in self.registry:
            raise AdapterNotFound.named(adapter, "adapter")
        return adapter


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
