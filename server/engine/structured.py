"""Structured outputs: constrain a request's tokens to a JSON schema, a regex or a grammar.

xgrammar does the work (it is what vLLM uses, and it runs on the CPU): a constraint is
written as one grammar in xgrammar's EBNF (`ebnf`, which the vLLM backend hands
to vLLM, so both backends constrain to the same grammar), compiled once over this
tokenizer's vocabulary, cached by its text (LRU, bounded in bytes: xgrammar's own
compiler cache), and each request gets its own matcher,
which says after every token which tokens may come next. Each step, the engine writes the
next-token bitmask of every constrained request into one preallocated buffer and applies
it to those requests' rows of the logits only, so constrained and free requests, on
different adapters, share one step.
"""

import hashlib
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Literal

import torch
import xgrammar as xgr

from lorag.errors import InvalidRequest, Overloaded

KINDS = ("json_object", "json_schema", "regex", "grammar")
GRAMMAR_CACHE_BYTES = 64 << 20  # compiled grammars kept; least recently used leave first
COMPILE_S = 10.0  # the longest one constraint may take to compile (`--grammar-compile-s`)
COMPILE_THREADS = 2  # compiles at once
TOO_SLOW_KEPT = 1024  # grammars remembered as past the budget, refused again at once
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: Check failed: (...) is false:"
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match.

    kind: json_object (any JSON object), json_schema (`spec` is the schema as JSON text),
    regex (`spec` is the pattern), grammar (`spec` is EBNF in xgrammar's dialect, which
    reads llama.cpp's GBNF; the start rule is `root`).
    """

    kind: Literal["json_object", "json_schema", "regex", "grammar"]
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidRequest(f"response_format type must be one of {', '.join(KINDS)}, "
                                 f"got {self.kind!r}", field="response_format")
        if self.kind != "json_object" and not self.spec.strip():
            raise InvalidRequest(f"response_format: the {self.kind} is empty",
                                 field="response_format")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except (ValueError, RecursionError) as e:
                raise InvalidRequest(f"response_format: the json_schema is not valid JSON: "
                                     f"{e}", field="response_format") from e
            if not isinstance(schema, dict):
                raise InvalidRequest("response_format: the json_schema must be a JSON object, "
                                     f"got {self.spec[:40]!r}", field="response_format")

    @classmethod
    def of_schema(cls, schema: dict) -> "Constraint":
        """A json_schema constraint from a parsed schema (HTTP bodies). How large a schema
        may be is the service's to say (server/limits.py)."""
        try:
            return cls("json_schema", json.dumps(schema))
        except RecursionError as e:
            raise InvalidRequest("response_format: the json_schema nests too deep to be "
                                 "read", field="response_format") from e

    def json_schema(self) -> dict:
        """The JSON schema to compile (json_object: any object), with length-bounded strings
        written as patterns (see `_bounded_strings`)."""
        if self.kind == "json_object":
            return {"type": "object"}
        return _bounded_strings(json.loads(self.spec))


def depth(value) -> int:
    """How deeply objects and arrays nest in `value` (a walk with its own stack)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1)
                           for child in (item.values() if isinstance(item, dict) else item))
    return deepest


# A JSON string's characters: no quote, no backslash, no control character (JSON forbids
# them raw). xgrammar 0.2.8 compiles minLength / maxLength to a character class that lets
# control characters through (`[^"\\\r\n]`), so a model could write invalid JSON; a
# pattern with the right class and the same bounds compiles correctly.
_STRING_CHARACTER = r'[^"\\\x00-\x1f]'


def _bounded_strings(node):
    """`node` with every plain string schema that has minLength / maxLength (and no
    pattern, format, enum or const) rewritten as the equivalent pattern."""
    if isinstance(node, list):
        return [_bounded_strings(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _bounded_strings(value) for key, value in node.items()}
    bounds = ("minLength", "maxLength")
    if node.get("type") == "string" and any(b in node for b in bounds) and not any(
            key in node for key in ("pattern", "format", "enum", "const")):
        low, high = node.pop("minLength", 0), node.pop("maxLength", "")
        node["pattern"] = f"^{_STRING_CHARACTER}{{{low},{high}}}$"
    return node


def ebnf(constraint: Constraint) -> str:
    """The constraint as a grammar in xgrammar's EBNF (under a millisecond); an
    InvalidRequest naming why when it cannot be one.

    JSON is written as `json.dumps` writes it: `", "` and `": "` between items, no other
    whitespace. Free whitespace lets a small model wander into blank lines until
    max_tokens; compact separators (vLLM's `disable_any_whitespace`) force token
    boundaries an adapter trained on ordinary JSON never saw, and the demo measured such
    an adapter's accuracy falling from 80% to 30% under them.
    """
    try:
        if constraint.kind == "regex":
            grammar = xgr.Grammar.from_regex(constraint.spec)
        elif constraint.kind == "grammar":
            grammar = xgr.Grammar.from_ebnf(constraint.spec)
        else:
            grammar = xgr.Grammar.from_json_schema(json.dumps(constraint.json_schema()),
                                                   any_whitespace=False)
    except RuntimeError as e:  # xgrammar's parse and conversion errors
        reason = _LOCATION.sub("", str(e).strip().splitlines()[0])
        raise InvalidRequest(f"response_format: the {constraint.kind} cannot be used: "
                             f"{reason}", field="response_format") from e
    return str(grammar)


class Grammars:
    """Compiles constraints for one tokenizer and hands out per-request matchers.

    A compile may take at most `compile_s` seconds: a constraint that takes longer is
    refused (InvalidRequest), and so is the same grammar sent again, at once. xgrammar
    cannot be interrupted, so the compile finishes in its thread in the background (it
    releases the GIL: the step loop and other requests carry on); COMPILE_THREADS run at
    once, and a constraint that finds none free within the budget gets Overloaded.

    The compiler is built at the first constraint, not with the engine: reading the
    vocabulary into xgrammar takes ~0.5 s, which an engine that never constrains (and
    every engine start) need not pay."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int],
                 cache_bytes: int = GRAMMAR_CACHE_BYTES, compile_s: float = COMPILE_S):
        self.vocab_size = vocab_size  # the logits' width (the model's, not the tokenizer's)
        self.stop_ids = sorted(stop_ids)
        self._tokenizer, self._cache_bytes = tokenizer, cache_bytes
        self._compiler: xgr.GrammarCompiler | None = None
        self._building = threading.Lock()
        self.compile_s = compile_s
        self.slots = threading.BoundedSemaphore(COMPILE_THREADS)
        self.too_slow: OrderedDict[str, None] = OrderedDict()  # grammars past the budget

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        """xgrammar's compiler for this vocabulary, built on first use."""
        with self._building:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1,
                                                     cache_limit_bytes=self._cache_bytes)
            return self._compiler

    def cache_bytes(self) -> int:
        """Bytes of compiled grammars kept (0 before the first constraint)."""
        return 0 if self._compiler is None else self._compiler.get_cache_size_bytes()

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """The constraint's grammar, compiled for this vocabulary (cached by its text)."""
        text = ebnf(constraint)
        compiler = self.compiler  # outside the budget: built once, not the constraint's cost
        digest = hashlib.sha256(text.encode()).hexdigest()
        refused = InvalidRequest(
            f"response_format: the {constraint.kind} takes longer than {self.compile_s:g} s "
            "to compile (the daemon's --grammar-compile-s); a smaller or less repetitive "
            "one compiles faster", field="response_format")
        if digest in self.too_slow:
            raise refused
        if not self.slots.acquire(timeout=self.compile_s):
            raise Overloaded("every grammar compile thread is busy; retry later",
                             field="response_format")
        compiled = Future()

        def run() -> None:  # a daemon thread: one past the budget never holds up an exit
            try:
                compiled.set_result(compiler.compile_grammar(text))
            except BaseException as e:
                compiled.set_exception(e)
            finally:
                self.slots.release()

        threading.Thread(target=run, name="lorag-grammar", daemon=True).start()
        try:
            return compiled.result(timeout=self.compile_s)
        except FutureTimeout:
            self.too_slow[digest] = None
            while len(self.too_slow) > TOO_SLOW_KEPT:
                self.too_slow.popitem(last=False)
            raise refused from None

    def matcher(self, constraint: Constraint) -> xgr.GrammarMatcher:
        """A fresh matcher for one request (compiling the constraint if it is new)."""
        return xgr.GrammarMatcher(self.compile(constraint), override_stop_tokens=self.stop_ids)

    def bitmask(self, rows: int) -> torch.Tensor:
        """A next-token bitmask buffer for `rows` requests: int32 [rows, vocab / 32]."""
        return xgr.allocate_token_bitmask(rows, self.vocab_size)


def token_bytes(tokenizer) -> list[bytes]:
    """Each token id's bytes as it adds them to the text (a piece of a UTF-8 character for
    some byte-level tokens; a special token's own text)."""
    return xgr.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab


def mask_logits(logits: torch.Tensor, bitmask: torch.Tensor,
                matchers: list[xgr.GrammarMatcher | None]) -> None:
    """Set the logits of tokens a row's grammar forbids to -inf, in place.

    logits: [rows, vocab] float32; matchers: one per row, None for a free row (its logits
    are untouched); bitmask: a buffer with at least `rows` rows.
    """
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return
    for row in rows:
        matchers[row].fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask[:len(matchers)].to(logits.device),
                                    indices=rows)


def grammar_prefix(matcher: xgr.GrammarMatcher, tokens: list[int]) -> list[int]:
    """The longest prefix of `tokens` (speculative drafts) that the matcher's grammar
    allows from its state, ending at a stop token that completes it at the latest; the
    matcher is left in the state it was in."""
    kept = []
    for token in tokens:
        if matcher.is_terminated() or not matcher.accept_token(token):
            break
        kept.append(token)
    if kept:
        matcher.rollback(len(kept))
    return kept


def mask_drafted(logits: torch.Tensor, bitmask: torch.Tensor, matcher: xgr.GrammarMatcher,
                 draft: list[int]) -> None:
    """Mask a drafted sequence's verify rows in place: logits [len(draft) + 1, vocab],
    row i by the grammar's state after draft[:i] (`grammar_prefix` made the drafts ones
    it allows); bitmask: a buffer with at least that many rows. A row after a stop token
    is left as it is (the sequence ends there). The matcher is left as it was."""
    for row, token in enumerate([*draft, None]):
        if matcher.is_terminated():
            bitmask[row] = -1  # every token allowed: never sampled
        else:
            matcher.fill_next_token_bitmask(bitmask, row)
        if token is not None:
            matcher.accept_token(token)
    if draft:
        matcher.rollback(len(draft))
    xgr.apply_token_bitmask_inplace(logits, bitmask[:len(draft) + 1].to(logits.device))
