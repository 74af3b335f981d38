"""Request bodies of the HTTP API, validated by pydantic at the edge.

OpenAI's field names and defaults; lorag's extensions are `adapters` (a weighted
composition), `rag` (retrieval from a namespace, chat only), `top_k` and `ignore_eos`.
The retrieval routes' bodies are here too. Fields OpenAI defines that lorag does not
implement are refused when set to anything but their no-op value, never silently
ignored; unknown fields are refused, so a typo is an error rather than a surprise.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorag.adapters import MAX_COMPOSITION
from lorag.server import requests

Scalar = str | int | float | bool
Filter = dict[str, Scalar | list[Scalar]]
SearchMode = Literal["vector", "bm25", "hybrid"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterWeight(_Body):
    """One adapter of a composition."""

    name: str = Field(min_length=1)
    weight: float = Field(default=1.0, allow_inf_nan=False)


class StreamOptions(_Body):
    """OpenAI's stream_options."""

    include_usage: bool = False


class _Generation(_Body):
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
    n: Literal[1] = 1
    user: str | None = None
    ignore_eos: bool = False
    adapters: list[AdapterWeight] | None = Field(default=None, min_length=1,
                                                 max_length=MAX_COMPOSITION)
    # OpenAI fields lorag does not implement: accepted only at their no-op values
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[False] | None = None

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def composition(self) -> list[tuple[str, float]] | None:
        """The `adapters` extension as (name, weight) pairs."""
        return [(a.name, a.weight) for a in self.adapters] if self.adapters else None

    def sampling(self, max_tokens: int | None) -> requests.Sampling:
        """The sampling fields; what is not set takes the service's default."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return requests.Sampling(max_tokens, self.temperature, self.top_p, self.top_k,
                                 self.seed, stop, self.ignore_eos)


class CompletionBody(_Generation):
    """POST /v1/completions."""

    prompt: str | list[int] = Field(min_length=1)
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None

    def to_request(self) -> requests.CompletionRequest:
        """The service's completion request."""
        return requests.CompletionRequest(self.prompt, self.model, self.composition(),
                                          self.sampling(self.max_tokens))


class Message(_Body):
    """One chat message; content is text or OpenAI's list of text parts."""

    role: Literal["system", "user", "assistant"]
    content: str | list[dict]
    name: str | None = None

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


class RagOptions(_Body):
    """The `rag` extension: answer from passages retrieved out of a namespace."""

    namespace: str = Field(min_length=1)
    top_k: int | None = Field(default=None, ge=1, le=requests.RAG_MAX_TOP_K)
    mode: SearchMode | None = None
    filter: Filter | None = None


class ChatBody(_Generation):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    rag: RagOptions | None = None

    def to_request(self) -> requests.ChatRequest:
        """The service's chat request (messages as the chat template wants them)."""
        rag = None if self.rag is None else requests.Rag(**self.rag.model_dump(
            exclude_none=True))
        return requests.ChatRequest(
            [{"role": m.role, "content": m.content} for m in self.messages], self.model,
            self.composition(), self.sampling(self.max_completion_tokens or self.max_tokens),
            rag)


class LoadLora(_Body):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLora(_Body):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class AdapterLoad(_Body):
    """POST /v1/adapters."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    shared: bool = False


class Document(_Body):
    """One document to index."""

    id: str = Field(min_length=1, max_length=512)
    text: str = Field(min_length=1)
    metadata: dict = Field(default_factory=dict)


class DocumentsBody(_Body):
    """POST /v1/namespaces/{ns}/documents: one document, or {"documents": [...]}."""

    id: str | None = Field(default=None, min_length=1, max_length=512)
    text: str | None = Field(default=None, min_length=1)
    metadata: dict | None = None
    documents: list[Document] | None = Field(default=None, min_length=1, max_length=1000)

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


class SearchBody(_Body):
    """POST /v1/namespaces/{ns}/search."""

    query: str = Field(min_length=1)
    top_k: int = Field(default=5, ge=1, le=100)
    mode: SearchMode = "hybrid"
    filter: Filter | None = None


class NamespaceBody(_Body):
    """PUT /v1/namespaces/{ns}."""

    shared: bool = False
