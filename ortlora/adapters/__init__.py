"""Adapters: PEFT checkpoints in, `.onnx_adapter` files out, and the check that an adapter fits a model."""


def __getattr__(name: str):
    # the command's work function, imported on first use (convert imports this package's modules)
    if name == "convert_adapters":
        from ortlora.adapters.convert import convert_adapters

        return convert_adapters
    raise AttributeError(f"module 'ortlora.adapters' has no attribute {name!r}")
