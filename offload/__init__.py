"""offload: run Mixture-of-Experts GGUF models on a machine with less memory than the model."""

from .errors import OffloadError
from .model import Model

__version__ = "0.1.0"
__all__ = ["Model", "OffloadError", "__version__"]
