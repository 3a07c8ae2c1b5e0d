"""Errors users see. Each names the thing at fault (a file, a config key) and what is wrong."""


class MtpslError(Exception):
    """Base class: the CLI prints these as one line instead of a traceback."""


class DataError(MtpslError):
    """A dataset folder, file or split file is missing or malformed."""


class ConfigError(MtpslError):
    """A config key or value is invalid."""
