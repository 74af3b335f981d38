"""The multi-adapter engine: continuous batching with per-token LoRA slots.

Public face: `Engine` (submit, stream, cancel, load / unload / list adapters, stats),
`EngineConfig`, `SamplingParams`.
"""

from lorag.server.engine.config import EngineConfig
from lorag.server.engine.engine import Engine
from lorag.server.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams"]
