"""Typed errors. Every user-facing failure is a QError that says what to do."""

from __future__ import annotations


class QError(Exception):
    """Base class: the message is shown to the user as is, without a traceback."""

    exit_code = 2


class UnknownNameError(QError, KeyError):
    """A scheme, format or engine name that no plugin registered."""

    def __init__(self, kind: str, name: str, choices: list[str]):
        self.kind, self.name, self.choices = kind, name, sorted(choices)
        listed = ", ".join(self.choices) or "(none registered)"
        super().__init__(f"unknown {kind} '{name}'; choose one of: {listed}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class DuplicateNameError(QError):
    """Two plugins registered the same name."""


class PluginLoadError(QError):
    """A plugin failed to import or register, or q itself is not installed."""


class IncompatibleError(QError):
    """A recipe and a format (or engine) that cannot work together."""


class CheckpointError(QError):
    """A model directory or checkpoint that cannot be read as it is."""


class BadTensorError(CheckpointError):
    """A tensor whose values cannot be quantized (NaN/Inf) or whose bytes are broken."""


class OutputExistsError(QError):
    """The output directory exists and --overwrite was not given."""


class OptionError(QError):
    """A command-line or API option that does not apply or has a bad value."""
