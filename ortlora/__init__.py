"""ortlora: one language model, many LoRA adapters, on ONNX Runtime."""

__version__ = "0.1.0"

from ortlora.errors import OrtloraError  # noqa: E402

__all__ = ["OrtloraError", "__version__"]
