"""The errors peftc raises. Each message names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "PeftcError",
    "CaptureError",
    "PipelineSyntaxError",
    "UnknownPassError",
    "OptionError",
    "TargetError",
    "PassError",
    "VerificationError",
    "ModelNotFoundError",
    "ExportError",
    "CheckpointError",
    "NotMergeable",
    "suggest",
]


class PeftcError(Exception):
    """Base class of every error peftc raises on purpose."""


class CaptureError(PeftcError):
    """The model could not be captured as a graph."""


class PipelineSyntaxError(PeftcError):
    """Pipeline text that does not parse; the message points at the column."""

    def __init__(self, problem: str, text: str, line: int, column: int, hint: str = ""):
        self.problem, self.text, self.line, self.column = problem, text, line, column
        source_line = text.splitlines()[line - 1] if text.splitlines() else ""
        message = (
            f"{problem} (line {line}, column {column + 1})\n  {source_line}\n  {' ' * column}^"
        )
        super().__init__(message + (f"\n{hint}" if hint else ""))


class UnknownPassError(PipelineSyntaxError):
    """A pipeline names a pass that is not registered."""


class OptionError(PeftcError):
    """A pass option is unknown, of the wrong type or out of range."""


class TargetError(PeftcError):
    """A target pattern matched no site."""


class PassError(PeftcError):
    """A pass failed while rewriting the graph."""


class VerificationError(PeftcError):
    """The graph a pass left behind is broken: lint, shapes or numerics."""


class ModelNotFoundError(PeftcError):
    """A model name the CLI cannot resolve."""


class ExportError(PeftcError):
    """A graph or request the ONNX backend cannot export; nothing is written."""


class CheckpointError(PeftcError):
    """A checkpoint that does not fit the model: missing, unexpected or misshapen tensors, or
    unknown fields."""


class NotMergeable(PeftcError):
    """A technique (or one of its options) that cannot be folded into the base weights."""


def suggest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """'did you mean ...?' text for `word`, or '' when nothing is close."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not close:  # abbreviations and long forms: 'rank' -> 'r'
        close = [c for c in choices if word.startswith(c) or c.startswith(word)][:n]
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
