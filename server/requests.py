"""What a transport hands the service, and what it gets back: plain values, no wire format.

HTTP (server/openai_api.py) and gRPC (server/grpc_service.py) unpack their messages into
these; the service fills in the defaults, here and nowhere else, and returns a `Reply`
that each transport packs its own way (JSON, SSE, gRPC messages).
"""

from dataclasses import dataclass, field, replace

from lorag.errors import InvalidRequest
from lorag.retrieval import RAG_MAX_TOP_K, RAG_TOP_K, SEARCH_MODE
from lorag.roles import ROLES, canonical
from lorag.server.engine import SamplingParams
from lorag.server.engine.structured import Constraint
from lorag.server.metrics import TrackedStream
from lorag.server.tools import ToolUse

MAX_CHOICES = 16  # n: choices one request may ask for (each is a sequence in the batch)
COMPLETION_TOKENS = 16  # max_tokens of a completion that gives none (OpenAI's default)
RAG_ANSWER_TOKENS = 256  # room kept for the answer when a RAG chat gives no max_tokens
# Without max_tokens, a chat may use the rest of the context (as vLLM does).
# What a request gets for a sampling field it leaves out (OpenAI's and vLLM's defaults).
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "presence_penalty": 0.0,
                     "frequency_penalty": 0.0, "repetition_penalty": 1.0}


@dataclass(kw_only=True)
class Sampling:
    """How to sample, OpenAI's meanings; None takes the default.

    logprobs: None for none, n for the sampled token's and the n most likely tokens'.
    constraint: what the output must match (`response_format`, `structured_outputs`).
    n: how many choices to sample for the prompt (choice i seeded `seed + i` when seeded).
    """

    max_tokens: int | None = None
    temperature: float | None = None  # default 1.0; 0 is greedy
    top_p: float | None = None  # default 1.0
    top_k: int | None = None  # default 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float | None = None  # default 0
    frequency_penalty: float | None = None  # default 0
    repetition_penalty: float | None = None  # default 1: off
    logprobs: int | None = None
    constraint: Constraint | None = None
    n: int = 1

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) \
                or not 1 <= self.n <= MAX_CHOICES:
            raise InvalidRequest(f"n must be an integer in 1..{MAX_CHOICES}, got {self.n!r}",
                                 field="n")

    def choice_params(self, default_max_tokens: int) -> list[SamplingParams]:
        """The engine's parameters for each of the n choices: the same, but for the seed
        (choice i's is seed + i, so each is its own reproducible stream)."""
        params = self.params(default_max_tokens)
        if self.seed is None:
            return [params] * self.n  # each choice draws from its own generator anyway
        return [replace(params, seed=self.seed + i) for i in range(self.n)]

    def params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's parameters, defaults filled in (SamplingParams checks ranges)."""
        given = {name: getattr(self, name) for name in SAMPLING_DEFAULTS}
        filled = {name: SAMPLING_DEFAULTS[name] if value is None else value
                  for name, value in given.items()}
        return SamplingParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            seed=self.seed, stop=list(self.stop), ignore_eos=self.ignore_eos,
            logprobs=self.logprobs, constraint=self.constraint, **filled)


@dataclass
class Rag:
    """Ground a chat in passages retrieved from one of the caller's namespaces."""

    namespace: str
    top_k: int = RAG_TOP_K
    mode: str = SEARCH_MODE
    filter: dict | None = None
    rerank: bool | None = None  # None: the namespace's default (rerank if it has a reranker)
    rerank_model: str | None = None  # the relevance adapter; None: the namespace's
    # a top-level string field of response_format's json_schema that may only name the
    # passages the prompt carries, or NO_SOURCE: citations valid by construction
    cite: str | None = None

    def __post_init__(self):
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= RAG_MAX_TOP_K:
            raise InvalidRequest(f"rag.top_k must be an integer in 1..{RAG_MAX_TOP_K}, got "
                                 f"{self.top_k!r}", field="rag.top_k")


@dataclass
class ChatRequest:
    """A chat turn. `model` is the base model's name or an adapter's; `adapters`, a
    weighted composition [(name, weight)], goes with `model` = the base model's name.
    A developer message is a system message (OpenAI renamed the role)."""

    messages: list[dict]  # {"role", "content", optional "name"} with text content
    model: str
    adapters: list[tuple[str, float]] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    rag: Rag | None = None
    tools: ToolUse | None = None  # offered functions (already in the messages' text)
    priority: int = 0  # the engine's: a batch's lines wait behind interactive requests

    def __post_init__(self):
        if not self.messages:
            raise InvalidRequest("messages is empty: a chat needs at least one message",
                                 field="messages")
        for i, message in enumerate(self.messages):
            if message.get("role") not in ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                                     f"got {message.get('role')!r}", field=f"messages.{i}.role")
            if not isinstance(message.get("content"), str):
                raise InvalidRequest(f"messages[{i}].content must be text",
                                     field=f"messages.{i}.content")
            self.messages[i] = {**message, "role": canonical(message["role"])}


@dataclass
class CompletionRequest:
    """A raw completion: the prompt is used as is, no chat template."""

    prompt: str | list[int]
    model: str
    adapters: list[tuple[str, float]] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    priority: int = 0  # as ChatRequest's


@dataclass
class Source:
    """A passage the answer was grounded in."""

    document_id: str
    chunk_id: int
    score: float
    metadata: dict
    text: str  # the passage as the prompt carried it


@dataclass
class Grounding:
    """What retrieval put into a chat: the passages used, best first, counts, the
    reranker if one reordered them, and what each stage took."""

    namespace: str
    sources: list[Source]
    retrieved: int
    dropped: int
    reranker: str | None = None
    search_ms: float = 0.0  # embedding the question and searching
    rerank_ms: float | None = None  # scoring the candidates, when reranked


@dataclass
class Reply:
    """A submitted request: a token stream per choice (n of them), and its grounding when
    it used `rag`."""

    streams: list[TrackedStream]
    grounding: Grounding | None = None
    tools: ToolUse | None = None  # the reply's calls are read out of its text

    @property
    def stream(self) -> TrackedStream:
        """The first choice's stream (the only one of an n = 1 request)."""
        return self.streams[0]

    @property
    def request_id(self) -> str:
        """The engine's id of this request (of its first choice)."""
        return self.stream.request_id


def check_texts(value: object, where: str = "") -> None:
    """Refuse text no model input or database row can hold, anywhere in `value` (a
    request's fields as plain dicts, lists and strings; keys included): a NUL, or a lone
    UTF-16 surrogate (JSON's "\\ud800"), which is no character and encodes to nothing.
    The error names the field by its path, e.g. `messages.1.content`. A walk with a stack
    of its own, not recursion: any nesting the JSON parser took is walked."""
    pending = [(value, where)]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            _check_text(item, path or "body", path or "body")
        elif isinstance(item, dict):
            for key, child in item.items():
                # a bad key is named by where it is: its own text cannot go into a message
                _check_text(str(key), f"a key of {path or 'the body'}", path or "body")
                pending.append((child, f"{path}.{key}" if path else str(key)))
        elif isinstance(item, list | tuple):
            pending.extend((child, f"{path}.{i}" if path else str(i))
                           for i, child in enumerate(item))


def _check_text(text: str, what: str, field: str) -> None:
    if "\x00" in text:
        raise InvalidRequest(f"{what} contains a NUL character (\\u0000) at character "
                             f"{text.index(chr(0))}; text may not hold one", field=field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"{what} contains a lone surrogate ({text[e.start]!r}) at "
                             f"character {e.start}, which is not text; send valid UTF-8 "
                             "(a surrogate escape only as half of a pair)",
                             field=field) from None
