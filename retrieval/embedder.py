"""Sentence embeddings from the model cache (default all-MiniLM-L6-v2), normalised."""

import threading
from functools import cached_property

import numpy as np

from lorag import catalog
from lorag.openmp import release_openmp_pool
from lorag.provision import ModelCache
from lorag.retrieval.chunking import Chunk, chunk_text
from lorag.settings import Settings

BATCH_SIZE = 64  # texts per forward pass


class Embedder:
    """Texts -> unit vectors [n, dim] float32, so inner product is cosine similarity.

    The model is read on first use, so a daemon that never retrieves never loads it. One
    call at a time uses the tokenizer: Hugging Face's fast tokenizer keeps its padding and
    truncation settings in one mutable object, and a call counting tokens (no padding) in
    one request thread stripped the padding of a batch another was encoding."""

    def __init__(self, ref: str = catalog.DEFAULT_EMBEDDER):
        self.name = ref
        self.lock = threading.Lock()

    @cached_property
    def model(self):
        """The SentenceTransformer (imported here: importing it takes seconds)."""
        from sentence_transformers import SentenceTransformer

        from lorag.models import resolve_dtype  # imports torch and transformers

        entry = catalog.find(self.name)
        path = ModelCache(Settings().models_dir).pull(entry) if entry else self.name
        model = SentenceTransformer(str(path), device="cpu")
        # bf16 where the CPU runs it natively: twice the fp32 rate here, and cosine to the
        # fp32 vectors >= 0.998
        return model.to(resolve_dtype("auto"))

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def dim(self) -> int:
        return self.model.get_embedding_dimension()

    @property
    def max_tokens(self) -> int:
        return self.model.max_seq_length

    def token_counts(self, texts: list[str]) -> list[int]:
        """Each text's tokens, special ones included, before the window (max_tokens) cuts
        it: what a request for these texts is counted in."""
        with self.lock:
            return [len(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def chunks(self, text: str, size: int, overlap: int) -> list[Chunk]:
        """`text` in chunks of `size` tokens of this model, `overlap` shared."""
        with self.lock:
            return chunk_text(text, self.tokenizer, size, overlap)

    def encode(self, texts: list[str]) -> np.ndarray:
        """texts: n strings -> [n, dim] float32, L2-normalised. The lock is taken per
        batch of BATCH_SIZE, so a query waits for one batch of a large ingest, not all."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batches = []
        try:
            for start in range(0, len(texts), BATCH_SIZE):
                with self.lock:
                    batches.append(self.model.encode(
                        texts[start:start + BATCH_SIZE], batch_size=BATCH_SIZE,
                        normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False))
        finally:  # idle OpenMP workers here would slow an engine's (lorag/openmp.py)
            release_openmp_pool()
        return np.concatenate(batches).astype(np.float32, copy=False)
