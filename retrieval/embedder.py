"""Sentence embeddings from the model cache (default all-MiniLM-L6-v2), normalised."""

import numpy as np
from sentence_transformers import SentenceTransformer

from lorag import catalog
from lorag.provision import ModelCache
from lorag.settings import Settings


class Embedder:
    """Texts -> unit vectors [n, dim] float32, so inner product is cosine similarity."""

    def __init__(self, ref: str = catalog.DEFAULT_EMBEDDER, batch_size: int = 64):
        entry = catalog.find(ref)
        path = ModelCache(Settings().models_dir).pull(entry) if entry else ref
        self.name = ref
        self.model = SentenceTransformer(str(path), device="cpu")
        self.tokenizer = self.model.tokenizer
        self.dim = self.model.get_embedding_dimension()
        self.max_tokens = self.model.max_seq_length
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        """texts: n strings -> [n, dim] float32, L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return vectors.astype(np.float32, copy=False)
