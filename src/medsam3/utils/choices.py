"""A named choice with a process-wide default that a CLI option sets for one command."""

from __future__ import annotations

from medsam3.errors import ModelSpecError


class ProcessDefault:
    """``option``'s allowed values and the current default (what library calls use when told nothing)."""

    def __init__(self, option: str, choices: tuple[str, ...], default: str):
        self.option = option
        self.choices = choices
        self._value = self.check(default)

    def check(self, choice: str) -> str:
        """``choice`` if allowed, else a one-line error naming the option and the allowed values."""
        if choice not in self.choices:
            raise ModelSpecError(f"{self.option} '{choice}': choose one of {', '.join(self.choices)}")
        return choice

    def set(self, choice: str) -> None:
        self._value = self.check(choice)

    def get(self) -> str:
        return self._value
