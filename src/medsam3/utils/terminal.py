"""What reaches the terminal: our own lines only, with nothing a user typed able to drive it.

- :func:`printable` escapes control characters (``\\x1b[2J`` in a prompt or a file name is shown,
  never obeyed); :func:`one_line` also folds line breaks, for one-line error messages.
- :func:`quiet_native_stderr` silences C and C++ libraries that print to the process's stderr
  themselves (the NIfTI library's ``** ERROR``, ITK's and GDCM's warnings) around a call whose
  failure we report ourselves, as one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with control characters (ANSI escapes, bells, bidi overrides) shown as ``\\xNN``/``\\uNNNN``.

    Line feeds and tabs are kept, so multi-line tables print as they are.
    """

    def escape(match: re.Match) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(escape, str(text))


def one_line(text: object) -> str:
    """``text`` as one printable line: runs of whitespace (line breaks too) become one space."""
    return printable(" ".join(str(text).split()))


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to the null device for the duration (Python's own stderr is flushed first).

    Native libraries write there directly, below ``sys.stderr``; our error, raised afterwards, says
    what went wrong. Does nothing where descriptor 2 cannot be duplicated.
    """
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
        finally:
            os.close(null)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
