"""Sentence embeddings from the model cache (default all-MiniLM-L6-v2), normalised."""

from functools import cached_property

import numpy as np

from lorag import catalog
from lorag.openmp import release_openmp_pool
from lorag.provision import ModelCache
from lorag.settings import Settings

BATCH_SIZE = 64  # texts per forward pass


class Embedder:
    """Texts -> unit vectors [n, dim] float32, so inner product is cosine similarity.

    The model is read on first use, so a daemon that never retrieves never loads it."""

    def __init__(self, ref: str = catalog.DEFAULT_EMBEDDER):
        self.name = ref

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
        return [len(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def encode(self, texts: list[str]) -> np.ndarray:
        """texts: n strings -> [n, dim] float32, L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            vectors = self.model.encode(texts, batch_size=BATCH_SIZE,
                                        normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=False)
        finally:  # idle OpenMP workers here would slow an engine's (lorag/openmp.py)
            release_openmp_pool()
        return vectors.astype(np.float32, copy=False)
