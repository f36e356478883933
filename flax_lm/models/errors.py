"""The one error type of the models: a config or model files they cannot use.

A ValueError, as a library raises for input it cannot take; its message says what to change.
The commands show it as one `error:` line, as they do their own UserError (flax_lm.errors).
"""

from __future__ import annotations


class ModelError(ValueError):
    """A model config or model directory the models cannot use; the message says why."""
