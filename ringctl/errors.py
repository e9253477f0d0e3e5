"""Specific exceptions with actionable text (the key, what was given, what is allowed), and
the one check of a positive integer that config, topology and planner share."""

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


def check_positive_int(key: str, value: Any) -> int:
    """`value` if it is an int >= 1 (bools are not ints here), else ConfigError naming `key`.

    Strict on purpose: config values arrive typed (OmegaConf checks the schema), so a float
    or a string here is a mistake to report, not to coerce.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "an integer >= 1")
    return value
