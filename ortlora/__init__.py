"""ortlora: one language model, many LoRA adapters, on ONNX Runtime."""

__version__ = "0.1.0"

from ortlora.errors import OrtloraError  # noqa: E402

__all__ = ["Model", "OrtloraError", "__version__"]


def __getattr__(name: str):
    # imported on first use, so `import ortlora` stays light (no onnxruntime) for the CLI and the train extra
    if name == "Model":
        from ortlora.runtime.model import Model

        return Model
    raise AttributeError(f"module 'ortlora' has no attribute {name!r}")
