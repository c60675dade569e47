"""Errors raised by optimum-mosaic; each message names the problem and the fix."""


class MosaicError(Exception):
    """Base class of every error this package raises on purpose."""


class UnsupportedArchitectureError(MosaicError, ValueError):
    """The model's ``model_type`` has no entry in the architecture table."""


class CalibrationError(MosaicError, ValueError):
    """The calibration data cannot provide what the configuration asks for."""


class CheckpointMismatchError(MosaicError, ValueError):
    """A saved checkpoint disagrees with its ``mosaic_config.json`` sidecar, or is incomplete."""


class OutputDirectoryError(MosaicError, ValueError):
    """A save cannot go where it was asked to (it would delete files, or cannot be written); raised before any work."""


class SparsityLostError(MosaicError, ValueError):
    """The weights hold fewer zeros than the prune left (e.g. fine-tuned without the masks): a card would claim
    sparsity they no longer have."""


class SparsityLostWarning(UserWarning):
    """A model holds fewer exact zeros than its prune left (fine-tuned without the masks, merged without them)."""


class FetchError(MosaicError, OSError, RuntimeError):
    """A packaged model could not be fetched from the package index (no index, no such wheel, a wrong checksum);
    a ``RuntimeError`` too, as it was before."""


_NETWORK_ERRORS = {("httpx", "TransportError"), ("httpx2", "TransportError"), ("requests", "ConnectionError")}
_NETWORK_ERRORS |= {("requests", "Timeout"), ("urllib3", "HTTPError"), ("builtins", "ConnectionError")}


def is_network_error(err: BaseException) -> bool:
    """Whether ``err`` says a server could not be reached (``httpx``/``httpx2``/``requests`` transport errors, a
    refused or reset connection, a timeout), without importing any of those libraries."""
    if isinstance(err, TimeoutError):
        return True
    return any((c.__module__.split(".")[0], c.__name__) in _NETWORK_ERRORS for c in type(err).__mro__)


class SaveError(MosaicError, OSError):
    """A save cannot be written (disk full, a file-size limit): raised before the work where that can be known,
    else when the write fails (the target is left as it was)."""
