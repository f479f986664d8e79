"""Adapters: PEFT checkpoints in, `.onnx_adapter` files out, and the check that an adapter fits a model."""
