"""flax-lm: pretrain GPT-2 and RoBERTa from scratch in JAX/Flax NNX, export to transformers."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["create_model", "load_model", "save_model"]


def __getattr__(name: str):
    # Lazy: `import flax_lm` stays cheap for CLI commands that never touch a model.
    if name in __all__:
        from flax_lm.models import hf_io

        return getattr(hf_io, name)
    raise AttributeError(f"module 'flax_lm' has no attribute {name!r}")
