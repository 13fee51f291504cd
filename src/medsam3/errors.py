"""User-facing errors.

Anything a user can cause (a bad file, a bad box, an unknown model) raises a subclass of
:class:`MedSAM3Error` with a one-line message. The CLI turns it into that line on stderr and
exit code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class MedSAM3Error(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class InputFileError(MedSAM3Error):
    """A file that cannot be used: missing, unreadable, corrupt, empty or of the wrong kind."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class PromptError(MedSAM3Error):
    """A prompt (phrase or box) that cannot be used."""


class ModelSpecError(MedSAM3Error):
    """A model spec, checkpoint or adapter that cannot be loaded."""


class DatasetError(MedSAM3Error):
    """A dataset folder whose layout or contents are wrong."""


class OutputError(MedSAM3Error):
    """An output path that cannot be used: it is, or would overwrite, an input; a file where a
    folder is needed or the reverse; or a place that cannot be written."""
