"""The error types ortlora raises. Every user-facing failure is an `OrtloraError` with a message that names the problem.

Callers tell failures apart by type, never by message text: the server maps each type to one HTTP status.
"""


class OrtloraError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ModelError(OrtloraError):
    """A model folder or checkpoint is missing, unreadable or unsupported."""


class AdapterError(OrtloraError):
    """An adapter is missing, unreadable, or does not fit the model."""


class AdapterNotFound(AdapterError):
    """No adapter of that name (or one the caller may not see: the message is the same)."""


class AdapterUnavailable(AdapterNotFound):
    """An adapter's source did not answer (timeout, refused connection, denied access, a server error): a not-found
    to callers that only know that type, which a retry later may cure."""


class AdapterExists(AdapterError):
    """An adapter of that name is already registered."""


class AdapterInvalid(AdapterError):
    """An adapter's file, name or weights are unusable: it does not parse, does not fit the model, holds NaN/inf,
    or makes the model's logits non-finite."""


class AdapterBusy(AdapterError):
    """The adapter (or every loaded adapter) is held by running generations: retry when they end."""


class GenerationError(OrtloraError):
    """A generation cannot go on (e.g. the model's logits hold NaN); it ends that request only."""


class StorageFull(OrtloraError):
    """The filesystem (or the quota) has no room for what was being written; nothing half-written is kept."""


class QueueFull(OrtloraError):
    """More requests wait than the scheduler's queue allows (`--max-queue`): refused at once (HTTP 429)."""


class ShuttingDown(OrtloraError):
    """The scheduler is draining or stopped and takes no new work (HTTP 503)."""
