"""Errors a user can act on. The CLI prints these as one message, never as a traceback."""


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
