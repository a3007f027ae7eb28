"""One error family: libraries raise these; the CLI turns them into a one-line message and exit code 2."""

from __future__ import annotations


class GptDeployError(Exception):
    """Base of every error gptdeploy raises on purpose; the message says what to do next."""


class ConfigError(GptDeployError):
    """A model configuration is inconsistent or incomplete."""


class SourceError(GptDeployError):
    """A checkpoint or model directory cannot be read or is not a supported kind."""


class ExportError(GptDeployError):
    """Export could not produce a bundle (the output already exists, the disk is full, ...)."""


class BundleError(GptDeployError):
    """A bundle is missing files, altered, from an unknown schema, or points outside itself."""


class ParityError(GptDeployError):
    """The exported graph disagrees with the source framework beyond tolerance."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class BackendUnavailable(GptDeployError):
    """A runtime backend cannot be used on this machine; the message names what is missing."""


class GenerationError(GptDeployError):
    """A generation request is invalid (empty prompt, bad sampling parameter, ...)."""


class ContextOverflowError(GenerationError):
    """Prompt plus requested tokens do not fit the model's context. `param` names the option to
    change ("prompt" or "max_new_tokens") when the raiser knows it; None otherwise."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(GptDeployError):
    """The batching engine's queue of waiting requests is full; retry after a moment."""


class RequestAborted(GenerationError):
    """A request ended before it finished: `reason` is "cancelled", "timeout" or "shutdown"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class RuntimeFailure(GptDeployError):
    """Running a checked request failed on the machine's side, not the caller's: onnxruntime or
    TensorRT failed a step, the model produced NaN logits, or the engine hit an unexpected fault.
    The message says what failed; a server answers 500 and keeps the detail in its log."""


class AuditError(GptDeployError):
    """An audit log or record cannot be read or written."""
