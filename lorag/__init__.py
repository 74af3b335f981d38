"""lorag: one quantized base model, many LoRA adapters, grounded by retrieval.

This package is the shared kernel that `server`, `trainer` and `retrieval` build on:
settings, the model catalog and provisioning, base-model loading, errors and the CLI.
"""

__version__ = "0.1.0"
