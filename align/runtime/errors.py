"""Every error class of the package. Those under AlignError are errors a user can act on: the CLI prints them as
one message, never as a traceback. RowError and FormatError say why one row is rejected; they are collected
into the reject files, not raised to the user."""


class AlignError(Exception):
    """Base class: the message says what is wrong, where, and how to fix it."""


class ConfigError(AlignError):
    pass


class DataError(AlignError):
    pass


class ModelError(AlignError):
    pass


class OutputError(AlignError):
    pass


class TrainingStopped(AlignError):
    """A guard stopped the run: the message says why, and the last checkpoint is kept."""


class OutOfMemory(AlignError):
    """A step did not fit in memory."""


class NumericError(AlignError):
    """Weights about to be saved are not finite."""


class RewardError(AlignError):
    """A reward function failed on a row: the message names the function, the row and what it returned."""


class RowError(ValueError):
    """Why one row cannot be used."""


class NotAPair(Exception):
    """A valid row that holds no preference (a person's tie or "both bad"): left out, neither used nor rejected."""


class FormatError(ValueError):
    """An example this tokenizer/template cannot turn into a training sequence; the message is the reason."""


class MergeVerificationError(OutputError):
    """The merged model does not reproduce base + adapter within the thresholds; nothing was written."""
