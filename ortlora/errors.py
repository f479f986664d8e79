"""The error types ortlora raises. Every user-facing failure is an `OrtloraError` with a message that names the problem."""


class OrtloraError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ModelError(OrtloraError):
    """A model folder or checkpoint is missing, unreadable or unsupported."""


class AdapterError(OrtloraError):
    """An adapter is missing, unreadable, or does not fit the model."""


class GenerationError(OrtloraError):
    """A generation cannot go on (e.g. the model's logits hold NaN); it ends that request only."""
