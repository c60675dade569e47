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
