"""User-facing errors: one line that names what is wrong, exit status 2."""


class ConfigError(ValueError):
    """A configuration value (YAML, CLI override or derived setting) is invalid.

    The message names the offending field; entry points print it as one line and exit with 2.
    """


class DataError(ValueError):
    """A data file or data setting is invalid (missing corpus, tokenizer mismatch, ...)."""


class CheckpointError(ValueError):
    """A checkpoint or model directory cannot be read or is not one this trainer understands."""


class TrainingHalted(RuntimeError):
    """Training stopped itself (e.g. repeated non-finite losses); the message names the saved state."""


USER_ERRORS = (ConfigError, DataError, CheckpointError)
EXIT_USAGE = 2
EXIT_HALTED = 3
