"""Errors smoe raises for user mistakes: the CLI prints them as one line and exits 2."""


class SmoeError(Exception):
    """Base class: a problem with the user's input (path, file, flag), not a bug in smoe."""


class ConfigError(SmoeError, ValueError):
    """A config.json / params.json that smoe cannot run."""


class CheckpointError(SmoeError, ValueError):
    """A weights file that is missing, corrupt, or does not match its config."""


class TokenizerError(SmoeError, ValueError):
    """A tokenizer file that is missing or unreadable."""


class GenerationError(SmoeError, ValueError):
    """A generation request that cannot be served (too long, bad sampling values)."""
