"""Specific exceptions with actionable text: the key, what was given, what is allowed."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value that cannot be used. The CLI prints it on one line and exits 2."""

    def __init__(self, key: str, given: Any, allowed: str, hint: str = "") -> None:
        self.key, self.given, self.allowed = key, given, allowed
        msg = f"{key}={given!r} is invalid; allowed: {allowed}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
