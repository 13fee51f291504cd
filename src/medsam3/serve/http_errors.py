"""Which HTTP status a user-caused problem gets, and the one-line JSON body that explains it.

Bad input is always a 4xx with ``{"error": "<one line>"}``: the toolkit's readers and prompt checks
raise :class:`~medsam3.errors.MedSAM3Error` subclasses with one-line messages, mapped here. A 5xx is
left for the server's own faults (a time limit hit while waiting for the model, or a bug).
"""

from __future__ import annotations

from medsam3.data.windowing import WindowError
from medsam3.errors import InputFileError, MedSAM3Error, ModelSpecError, PromptError


class ApiError(MedSAM3Error):
    """An error response: status, one-line message, optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        self.status = status
        self.headers = headers or {}
        super().__init__(message)


def not_found(what: str, ident: str) -> ApiError:
    shown = ident if len(ident) <= 64 else ident[:61] + "..."
    return ApiError(404, f"no {what} '{shown}' (unknown, expired or evicted)")


def status_for(error: MedSAM3Error) -> int:
    """400 for a bad request (prompt, box, window, option), 422 for a file that cannot be used."""
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status
    if isinstance(error, InputFileError):
        return 422
    if isinstance(error, (PromptError, WindowError, ModelSpecError)):
        return 400
    return 400


def one_line(text: object, limit: int = 400) -> str:
    return " ".join(str(text).split())[:limit]
