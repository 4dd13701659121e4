"""The error every user mistake in configuration becomes."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work: names the dotted key, the value given and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}' = {value!r} is not allowed: use {allowed}")


class HeavyliftError(RuntimeError):
    """A problem with the user's input or machine (not a bug): the message says what to change."""
