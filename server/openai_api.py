"""Request bodies of the HTTP API, validated by pydantic at the edge.

OpenAI's field names and defaults; lorag's extensions are `adapters` (a weighted
composition), `rag` (retrieval from a namespace, chat only), `structured_outputs` (a
regex or a grammar, vLLM's field), `top_k`, `repetition_penalty` and `ignore_eos`. The
retrieval routes' bodies are here too. Fields OpenAI defines that lorag does not
implement are refused when set to anything but their no-op value, never silently
ignored; unknown fields are refused with the list of those accepted, so a typo is an
error rather than a surprise.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lorag.adapters import MAX_COMPOSITION, MAX_COMPOSITION_WEIGHT
from lorag.retrieval import MAX_TOP_K, MODES, RAG_MAX_TOP_K, SEARCH_MODE, TOP_K
from lorag.roles import ROLES
from lorag.server import requests
from lorag.server.embeddings import ENCODINGS, EmbeddingsRequest
from lorag.server.engine.sampling import MAX_LOGPROBS
from lorag.server.engine.structured import Constraint
from lorag.server.requests import MAX_CHOICES, check_texts
from lorag.server.rerank import RerankRequest
from lorag.server.tools import ToolUse, template_messages, tool_use

Scalar = str | int | float | bool
Filter = dict[str, Scalar | list[Scalar]]
SearchMode = Literal[MODES]  # Literal["vector", "bm25", "hybrid"]
MAX_TOOLS = 128  # functions one chat may offer (OpenAI's limit)


class StrictBody(BaseModel):
    # strict: a value of another JSON type than the schema says (`"shared": 0`, `"n": "1"`)
    # is refused, not coerced
    model_config = ConfigDict(extra="forbid", strict=True)


    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        if isinstance(data, dict):
            accepted = [field.alias or name for name, field in cls.model_fields.items()]
            unknown = [key for key in data if key not in accepted]
            if unknown:
                raise PydanticCustomError(
                    "unknown_field", "unknown field '{field}'; accepted here: {accepted}",
                    {"field": unknown[0], "accepted": ", ".join(sorted(accepted))})
        return data


class RouteBody(StrictBody):
    """A route's whole body: its text is checked once, here, nested bodies included."""

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        check_texts(data)  # a NUL or a lone surrogate: InvalidRequest, 400 naming the field
        return data


class AdapterWeight(StrictBody):
    """One adapter of a composition."""

    name: str = Field(min_length=1)
    weight: float = Field(default=1.0, ge=-MAX_COMPOSITION_WEIGHT, le=MAX_COMPOSITION_WEIGHT)


class StreamOptions(StrictBody):
    """OpenAI's stream_options."""

    include_usage: bool = False


class JsonSchema(StrictBody):
    """OpenAI's response_format.json_schema. Decoding is always constrained to the schema
    (`strict` or not), so the output always parses and validates unless cut by max_tokens."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictBody):
    """OpenAI's response_format: text (unconstrained), json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('"json_schema" {"name", "schema", "strict"} goes with type '
                             '"json_schema", and only with it')
        return self

    def constraint(self) -> Constraint | None:
        """What the output must match; None for text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return Constraint("json_object")
        return Constraint.of_schema(self.json_schema.schema_)


class StructuredOutputs(StrictBody):
    """The `structured_outputs` extension (vLLM's name): a regex, or a grammar in EBNF
    (xgrammar's dialect, which reads llama.cpp's GBNF; the start rule is `root`)."""

    regex: str | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.regex is None) == (self.grammar is None):
            raise ValueError('give exactly one of "regex" and "grammar"')
        return self

    def constraint(self) -> Constraint:
        """What the output must match."""
        if self.regex is not None:
            return Constraint("regex", self.regex)
        return Constraint("grammar", self.grammar)


class _Generation(RouteBody):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    ignore_eos: bool = False
    adapters: list[AdapterWeight] | None = Field(default=None, min_length=1,
                                                 max_length=MAX_COMPOSITION)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _one_constraint(self):
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def composition(self) -> list[tuple[str, float]] | None:
        """The `adapters` extension as (name, weight) pairs."""
        return [(a.name, a.weight) for a in self.adapters] if self.adapters else None

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> requests.Sampling:
        """The sampling fields; what is not set takes the service's default."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        constraint = self.structured_outputs or self.response_format
        return requests.Sampling(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logprobs=logprobs,
            constraint=constraint and constraint.constraint(), n=self.n)


class CompletionBody(_Generation):
    """POST /v1/completions."""

    prompt: str | list[int] = Field(min_length=1)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # OpenAI fields lorag does not implement: accepted only at their no-op values
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _false_is_none(cls, value):
        return None if value is False else value  # some clients send false for "none"

    def to_request(self) -> requests.CompletionRequest:
        """The service's completion request."""
        return requests.CompletionRequest(self.prompt, self.model, self.composition(),
                                          self.sampling(self.max_tokens, self.logprobs))


class CalledFunction(StrictBody):
    """A past call's function: its name and its arguments, a JSON object as a string."""

    name: str = Field(min_length=1)
    arguments: str


class ToolCall(StrictBody):
    """A call an assistant message made (OpenAI's shape), answered by a `tool` message
    with its id."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(StrictBody):
    """One chat message; content is text or OpenAI's list of text parts. An assistant
    message may carry `tool_calls` (and no content); a `tool` message answers one of
    them by `tool_call_id`."""

    role: Literal[(*ROLES, "tool")]  # the roles lorag reads (lorag/roles.py), and tool
    content: str | list[dict] | None = None
    name: str | None = Field(default=None, min_length=1)
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1)
    tool_call_id: str | None = Field(default=None, min_length=1)

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content):
        if isinstance(content, list):
            if not all(p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError("content parts must be {'type': 'text', 'text': '...'}; "
                                 "this model reads text only")
            content = "".join(p["text"] for p in content)
        return content

    @model_validator(mode="after")
    def _calls_where_they_belong(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (only an assistant message with "
                             "tool_calls may leave it out)")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message, and only a tool message, has the "
                             "tool_call_id of the call it answers")
        return self


class FunctionSignature(StrictBody):
    """A function the model may call: its name, what it does, its parameters' JSON
    schema."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # arguments always follow the schema under required


class Tool(StrictBody):
    """OpenAI's function tool."""

    type: Literal["function"]
    function: FunctionSignature


class FunctionName(StrictBody):
    name: str = Field(min_length=1)


class NamedToolChoice(StrictBody):
    """tool_choice naming the one function the model must call."""

    type: Literal["function"]
    function: FunctionName


class RagOptions(StrictBody):
    """The `rag` extension: answer from passages retrieved out of a namespace."""

    namespace: str = Field(min_length=1)
    top_k: int | None = Field(default=None, ge=1, le=RAG_MAX_TOP_K)
    mode: SearchMode | None = None
    filter: Filter | None = None
    # rerank the candidates before packing them; left out: the namespace's default
    rerank: bool | None = None
    rerank_model: str | None = Field(default=None, min_length=1)  # the relevance adapter
    # the response_format json_schema's property that may only name a packed passage
    cite: str | None = Field(default=None, min_length=1, max_length=256)


class ChatBody(_Generation):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    rag: RagOptions | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def to_request(self) -> requests.ChatRequest:
        """The service's chat request (messages as the chat template wants them, tool
        calls and results in lorag's tool format: server/tools.py)."""
        rag = None if self.rag is None else requests.Rag(**self.rag.model_dump(
            exclude_none=True))
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        sampling = self.sampling(self.max_completion_tokens or self.max_tokens, logprobs)
        tools = self.tool_use()
        messages = template_messages([m.model_dump(exclude_none=True) for m in self.messages],
                                     tools)
        return requests.ChatRequest(messages, self.model, self.composition(), sampling, rag,
                                    tools)

    def tool_use(self) -> ToolUse | None:
        """The tools offered and how they may be called (None: no tools, or `none`)."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            choice = choice.function.name
        functions = [tool.function.model_dump(include={"name", "description", "parameters"},
                                              exclude_none=True) for tool in self.tools or []]
        return tool_use(functions, choice, self.parallel_tool_calls)


class LoadLora(RouteBody):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class RolloutBody(RouteBody):
    """POST /v1/adapters/{name}/rollout: {version: weight}, weights relative."""

    versions: dict[str, int] = Field(min_length=1)


class UnloadLora(RouteBody):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class AdapterLoad(RouteBody):
    """POST /v1/adapters."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    shared: bool = False


class Document(StrictBody):
    """One document to index."""

    id: str = Field(min_length=1, max_length=512)
    text: str = Field(min_length=1)
    metadata: dict = Field(default_factory=dict)


class DocumentsBody(RouteBody):
    """POST /v1/namespaces/{ns}/documents: one document, or {"documents": [...]}."""

    id: str | None = Field(default=None, min_length=1, max_length=512)
    text: str | None = Field(default=None, min_length=1)
    metadata: dict | None = None
    documents: list[Document] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_shape(self):
        single = self.id is not None or self.text is not None or self.metadata is not None
        if self.documents is not None and single:
            raise ValueError('give one document {"id", "text", "metadata"} or '
                             '{"documents": [...]}, not both')
        if self.documents is None and (self.id is None or self.text is None):
            raise ValueError('a document needs "id" and "text" (or send {"documents": [...]})')
        return self

    def items(self) -> list[dict]:
        """The documents as dicts."""
        if self.documents is not None:
            return [d.model_dump() for d in self.documents]
        return [{"id": self.id, "text": self.text, "metadata": self.metadata or {}}]


class SearchBody(RouteBody):
    """POST /v1/namespaces/{ns}/search."""

    query: str = Field(min_length=1)
    top_k: int = Field(default=TOP_K, ge=1, le=MAX_TOP_K)
    mode: SearchMode = SEARCH_MODE
    filter: Filter | None = None


class EmbeddingsBody(RouteBody):
    """POST /v1/embeddings (OpenAI's body): texts embedded by the daemon's embedder."""

    input: str | list[str | int | list[int]]  # ids are refused by the service, by name
    model: str = Field(min_length=1)
    encoding_format: Literal[ENCODINGS] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None  # OpenAI's end-user id: accepted, unused

    def to_request(self) -> EmbeddingsRequest:
        return EmbeddingsRequest(self.input, self.model, self.encoding_format,
                                 self.dimensions)


class NamespaceBody(RouteBody):
    """PUT /v1/namespaces/{ns}: its settings, all of them (what is left out is reset)."""

    shared: bool = False
    # the relevance adapter RAG chats on it rerank with unless they say otherwise
    reranker: str | None = Field(default=None, min_length=1)


class RerankDocument(StrictBody):
    """A document as an object (Cohere's and vLLM's other form)."""

    text: str


class RerankBody(RouteBody):
    """POST /v1/rerank (vLLM's and llama.cpp's body): order documents by relevance to a
    query, scored by a relevance adapter (`model`)."""

    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    documents: list[str | RerankDocument] = Field(min_length=1)
    top_n: int = Field(default=0, ge=0)  # 0: every document
    return_documents: bool = True

    def to_request(self) -> RerankRequest:
        texts = [d if isinstance(d, str) else d.text for d in self.documents]
        return RerankRequest(self.model, self.query, texts, self.top_n,
                             self.return_documents)


class ErrorDetail(BaseModel):
    """What went wrong: OpenAI's error object."""

    message: str
    type: str
    param: str | None = None  # the field at fault, when one is
    code: int  # the HTTP status


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": description}
                   for status, description in (
                       (400, "The request is malformed; the message names the field"),
                       (401, "No API key, or an unknown one"),
                       (403, "The key may not do this (not an admin key)"),
                       (404, "No such model, adapter, namespace or document for this caller"),
                       (409, "An adapter's files changed or went since it was registered"),
                       (413, "The request brings more than one of the daemon's limits allows"),
                       (429, "The queue, or the key's share of it, is full; retry later"),
                       (500, "A bug: the message gives a request id the log has"),
                       (503, "Draining, the engine stopped, or the state database is away"))}
