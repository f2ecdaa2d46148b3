"""Domain errors: each names the input that was wrong and what to do about it."""


class De3bertError(Exception):
    """Base class of every error de3bert raises on purpose."""


class DataError(De3bertError):
    """A data file, dataset or text is missing, malformed or inconsistent with its task."""


class CheckpointError(De3bertError):
    """A directory is not a usable de3bert checkpoint, or does not fit the task."""


class PolicyError(De3bertError):
    """An exit policy was configured with values it cannot use."""


class BackboneError(De3bertError):
    """A backbone could not be found, assembled or driven layer by layer."""


class DeviceError(De3bertError):
    """A device or precision was asked for that this machine cannot provide."""


class ExportError(De3bertError):
    """A model cannot be exported to ONNX or run on ONNX Runtime (unsupported model, graphs that disagree with
    PyTorch, ONNX Runtime not installed)."""
