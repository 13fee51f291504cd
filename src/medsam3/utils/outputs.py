"""Output paths, checked before any work: never overwrite an input, never write half an output.

Every command's library function calls these checks first, before reading an image or loading a
model, so a bad ``--out`` costs nothing and leaves nothing behind. A check raises
:class:`~medsam3.errors.OutputError` (one line, naming the path and the problem) when an output:

- is an input, would overwrite one, would replace a folder holding an input, or would sit inside
  an input folder that is read as a whole (a DICOM series, a frame folder, an evaluation run);
- is a folder where a file is needed, or a file where a folder is needed (also further up: an
  output under a file), or is a folder in the place of a file the command writes;
- cannot be written (permissions, a read-only file system): probed with a temporary entry that is
  removed at once, because ``os.access`` says yes to root even on a read-only mount.

:func:`unique_stems` gives file names derived from user text (prompt phrases) that never collide
with each other nor with the command's own fixed outputs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from medsam3.errors import OutputError

PathLike = str | os.PathLike


def _absolute(path: PathLike) -> Path:
    """``path`` made absolute with symlinks of its existing part resolved (never raises)."""
    try:
        return Path(path).expanduser().resolve(strict=False)
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def same_path(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file or folder (hard links and symlinks included)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return _absolute(a) == _absolute(b)


def is_inside(path: PathLike, folder: PathLike) -> bool:
    """True when ``path`` lies somewhere below ``folder`` (not ``folder`` itself)."""
    child, parent = _absolute(path), _absolute(folder)
    return child != parent and parent in child.parents


def _inputs(inputs: Iterable[PathLike | None]) -> list[Path]:
    return [Path(p) for p in inputs if p is not None and str(p) not in ("", "<array>")]


def _nearest_existing(folder: Path, output: Path) -> Path:
    """The closest existing folder at or above ``folder``; a file on the way is an error naming ``output``."""
    current = _absolute(folder)
    while not current.exists() and current.parent != current:
        current = current.parent
    if not current.is_dir():
        raise OutputError(f"{output}: cannot be created: {current} is a file, not a folder")
    return current


def _probe_writable(folder: Path, shown: Path) -> None:
    """Create and remove a temporary folder in ``folder``: the only check root cannot pass by default."""
    try:
        probe = tempfile.mkdtemp(prefix=".medsam3-probe-", dir=folder)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputError(f"{shown}: cannot be written: {folder}: {reason}") from None
    os.rmdir(probe)


def _check_against_inputs(
    path: Path, inputs: Sequence[Path], sealed: Sequence[Path], option: str, *, replaces: bool = False
) -> None:
    for source in [*inputs, *sealed]:
        if same_path(path, source):
            raise OutputError(f"{path}: {option} is the input {source}; it would be overwritten, choose another path")
        if replaces and is_inside(source, path):
            raise OutputError(
                f"{path}: {option} would replace this folder, which holds the input {source}; choose another folder"
            )
    for folder in sealed:
        if is_inside(path, folder):
            raise OutputError(
                f"{path}: {option} lies inside the input folder {folder}, which is read as a whole; "
                "choose a path outside it"
            )


def check_output_file(
    path: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    sealed: Iterable[PathLike | None] = (),
    option: str = "--out",
) -> Path:
    """Refuse an output file path that cannot be used (see the module doc); returns it as a Path.

    Nothing is created. ``inputs`` are the files and folders the command reads; ``sealed`` are input
    folders read as a whole (a DICOM series, a frame folder, an evaluation run), which no output may
    enter.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; {option} needs a file name")
    if path.exists() and not path.is_file():
        raise OutputError(f"{path}: is not a regular file (a device or pipe); {option} needs a file name")
    _check_against_inputs(path, _inputs(inputs), _inputs(sealed), option)
    _probe_writable(_nearest_existing(path.parent, path), path)
    return path


def check_output_folder(
    path: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    sealed: Iterable[PathLike | None] = (),
    files: Iterable[str] = (),
    replaces: bool = False,
    option: str = "--out",
) -> Path:
    """Refuse an output folder that cannot be used (see the module doc); returns it as a Path.

    ``files`` are the names the command will write inside it (a folder already there under one of
    them is refused, so is overwriting an input with one). ``replaces``: the command replaces the
    whole folder (then no input may lie inside it). ``sealed``: as for :func:`check_output_file`.
    Nothing is created.
    """
    path = Path(path)
    sources = _inputs(inputs) + _inputs(sealed)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: is a file; {option} needs a folder")
    _check_against_inputs(path, _inputs(inputs), _inputs(sealed), option, replaces=replaces)
    _probe_writable(_nearest_existing(path, path), path)
    if replaces:
        return path
    for name in files:
        target = path / name
        if target.is_dir() or (target.exists() and not target.is_file()):
            raise OutputError(
                f"{target}: is a folder, but this command writes its {name} there; move it away or choose "
                f"another {option}"
            )
        for source in sources:
            if same_path(target, source):
                raise OutputError(f"{target}: this output would overwrite the input {source}; choose another {option}")
    return path


def check_distinct(paths: Sequence[tuple[str, PathLike]]) -> None:
    """Refuse two outputs of one command that name the same file: ``[(option, path), ...]``."""
    for i, (first, a) in enumerate(paths):
        for second, b in paths[i + 1 :]:
            if same_path(a, b):
                raise OutputError(f"{a}: {first} and {second} name the same file; give them different paths")


def unique_stems(
    bases: Sequence[str],
    *,
    patterns: Sequence[str] = ("{}",),
    reserved: Iterable[str] = (),
    max_length: int = 80,
) -> list[str]:
    """One file-name stem per base, so that no file ``pattern.format(stem)`` of one collides with another's.

    ``reserved`` are the command's fixed output names (``overlay.png``): no stem may produce one, nor be
    one's stem (a mask called ``result.png`` next to ``result.json`` would be read as the result).
    A taken stem gets ``_2``, ``_3``, ... Comparisons ignore case (macOS and Windows file systems do).
    Stems are cut to ``max_length`` characters, well inside every file system's name limit.
    """
    reserved = [name.lower() for name in reserved]
    taken = set(reserved)
    blocked = {name.split(".", 1)[0] for name in reserved}
    stems = []
    for base in bases:
        base = base[:max_length].rstrip("_.") or "prompt"
        stem, number = base, 1
        while stem.lower() in blocked or any(p.format(stem).lower() in taken for p in patterns):
            number += 1
            stem = f"{base}_{number}"
        taken.update(p.format(stem).lower() for p in patterns)
        blocked.add(stem.lower())
        stems.append(stem)
    return stems
