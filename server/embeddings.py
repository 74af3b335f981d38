"""OpenAI's embeddings API on the daemon's embedder: the vectors retrieval indexes with, for
clients (LangChain's OpenAIEmbeddings, LlamaIndex) that embed through the same base URL.

An input is text, embedded whole: one longer than the embedder reads is refused, naming
it, rather than cut short in silence (OpenAI refuses too). Token-id inputs are refused:
OpenAI's clients send ids of OpenAI's own tokenizer, which mean nothing to this one.
"""

import base64
from dataclasses import dataclass

import numpy as np

from lorag import catalog
from lorag.errors import InvalidRequest, NotFound
from lorag.retrieval.embedder import Embedder
from lorag.server.limits import RequestLimits

ENCODINGS = ("float", "base64")


@dataclass
class EmbeddingsRequest:
    """OpenAI's body, as a transport hands it over: `input` one text or a list of texts."""

    input: str | list
    model: str
    encoding_format: str = "float"
    dimensions: int | None = None


@dataclass
class Embedded:
    """The vectors, one row per input [inputs, dim] (unit length), and what they cost."""

    vectors: np.ndarray
    prompt_tokens: int
    model: str
    encoding_format: str

    def data(self) -> list[dict]:
        """OpenAI's `data`: each vector as floats, or as base64 of little-endian float32."""
        return [{"object": "embedding", "index": i, "embedding": self._encode(row)}
                for i, row in enumerate(self.vectors)]

    def response(self) -> dict:
        """OpenAI's embeddings response."""
        return {"object": "list", "data": self.data(), "model": self.model,
                "usage": {"prompt_tokens": self.prompt_tokens,
                          "total_tokens": self.prompt_tokens}}

    def _encode(self, row: np.ndarray) -> list[float] | str:
        if self.encoding_format == "base64":
            return base64.b64encode(row.astype("<f4").tobytes()).decode()
        return row.tolist()


class Embeddings:
    """Embeds requests' texts on the embedder retrieval uses, within the request limits."""

    def __init__(self, embedder: Embedder, limits: RequestLimits):
        self.embedder, self.limits = embedder, limits

    @property
    def model(self) -> str:
        return self.embedder.name

    def embed(self, request: EmbeddingsRequest) -> Embedded:
        """The request's vectors, or a clear refusal naming the field at fault."""
        self._check_model(request.model)
        if request.encoding_format not in ENCODINGS:
            raise InvalidRequest(f"encoding_format must be one of {', '.join(ENCODINGS)}, "
                                 f"got {request.encoding_format!r}", field="encoding_format")
        texts = self._texts(request.input)
        if request.dimensions is not None and request.dimensions != self.embedder.dim:
            raise InvalidRequest(f"{self.model} gives {self.embedder.dim}-dimensional vectors; "
                                 f"dimensions must be {self.embedder.dim} or left out, got "
                                 f"{request.dimensions!r}", field="dimensions")
        tokens = self._count_tokens(texts)
        return Embedded(self.embedder.encode(texts), tokens, self.model,
                        request.encoding_format)

    def _check_model(self, model: str) -> None:
        entry = catalog.find(self.model)
        names = {self.model, *([entry.name, entry.hub_id] if entry else [])}
        if model not in names:
            raise NotFound(f"model {model!r} is not an embedding model of this daemon; it "
                           f"embeds with {self.model!r}", field="model")

    def _texts(self, given: str | list) -> list[str]:
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts:
            raise InvalidRequest("input must be a text or a non-empty list of texts",
                                 field="input")
        self.limits.check_embedding_inputs(len(texts))
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequest(
                    f"input[{i}] must be text; token ids are not taken (they would be another "
                    "tokenizer's: with LangChain's OpenAIEmbeddings set "
                    "check_embedding_ctx_length=False)", field=f"input.{i}")
            if not text:
                raise InvalidRequest(f"input[{i}] is empty", field=f"input.{i}")
        return texts

    def _count_tokens(self, texts: list[str]) -> int:
        """Tokens the embedder reads, special ones included; refuses an input it would cut."""
        most = self.embedder.max_tokens
        counts = self.embedder.token_counts(texts)
        for i, count in enumerate(counts):
            if count > most:
                raise InvalidRequest(f"input[{i}] has {count} tokens; {self.model} reads at "
                                     f"most {most}: split it", field=f"input.{i}")
        return sum(counts)
