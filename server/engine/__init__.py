"""The multi-adapter engine: continuous batching with per-token LoRA slots.

Public face: `Engine` (submit, stream, cancel, load / unload / list adapters, stats),
`EngineConfig`, `SamplingParams`.
"""

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams"]
