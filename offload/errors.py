"""Errors a user can act on.

Everything that is the user's input being wrong (a missing or corrupt file, an
unsupported architecture or quant type, a prompt longer than the context) raises an
`OffloadError`; the CLI prints its message as one line and exits non-zero. Any other
exception is a bug in offload and keeps its traceback.
"""


class OffloadError(Exception):
    """A problem with the user's input, explained in one line."""


class CorruptModelError(OffloadError):
    """The GGUF file is truncated, damaged, or not a GGUF file."""


class UnsupportedModelError(OffloadError):
    """A valid GGUF file that offload cannot run (architecture, quant type, feature)."""


class ContextOverflowError(OffloadError):
    """More tokens than the context window holds."""


class BudgetError(OffloadError):
    """A memory budget that is malformed, or too small for the model."""


class ExpertReadError(OffloadError):
    """Reading an expert's weights from the model file failed (I/O error, file changed)."""


class NonFiniteError(OffloadError):
    """A layer produced NaN or Inf: damaged weights, or activations that overflow float32."""


class ModelBusyError(OffloadError):
    """A Model was called from a second thread while another thread's call was running."""


class ModelFileChangedError(OffloadError):
    """The GGUF file was truncated, replaced or rewritten while the model was running from it."""
