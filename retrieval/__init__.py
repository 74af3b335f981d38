"""Retrieval: documents chunked, embedded and indexed per namespace (store.py), searched
by vector, BM25 or both fused, and packed into a chat (rag.py).

A search's modes and defaults, and a RAG chat's, live here, light enough for the CLI's
flags to import."""

MODES = ("vector", "bm25", "hybrid")
SEARCH_MODE = "hybrid"  # the default: both, fused by reciprocal rank
TOP_K = 5  # hits a search returns when the caller does not say
MAX_TOP_K = 100
RAG_TOP_K = 4  # passages a RAG chat packs when the caller does not say
RAG_MAX_TOP_K = 20  # passages one RAG chat may retrieve
