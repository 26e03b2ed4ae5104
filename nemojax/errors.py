"""Exception types, one per failure family, each carrying a message a user can act on."""


class NemojaxError(Exception):
    """Base class of every error nemojax raises on purpose."""


class ConfigError(NemojaxError, ValueError):
    """A model or run configuration is invalid; the message names the field."""


class CheckpointError(NemojaxError):
    """A checkpoint is unreadable, or its tensors do not match the model."""


class DataError(NemojaxError):
    """Training or serving data is missing or malformed; the message names the file."""


class QuantizationError(NemojaxError, ValueError):
    """A tensor cannot be quantized or dequantized as asked (shape, non-finite values, bad scales)."""


class OutputError(NemojaxError):
    """A result cannot be written (missing directory, full disk); the message names the file and what is kept."""


class NemojaxWarning(UserWarning):
    """Input that is used, but not as given (an ignored config field, a checkpoint skipped as unreadable)."""
