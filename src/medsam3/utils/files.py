"""Atomic file writing: a reader never sees a half-written output.

Every output goes to a temporary file in the destination folder, then ``os.replace`` moves it
into place (atomic on POSIX within one file system). If anything fails, the temporary file is
removed and the previous file, if any, survives untouched; an ``OSError`` (a full disk) then names
the destination, not the temporary.

Tensors are written through :func:`save_tensors` and :func:`save_torch`: serialised in memory, then
written by Python, because ``torch.save`` and safetensors' ``save_file`` report a full disk as a
``RuntimeError``/``SafetensorError`` without errno, which reads as a bug instead of "No space left".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Two-part endings that name one format; :func:`file_suffix` keeps them whole.
DOUBLE_SUFFIXES = (".nii.gz", ".seg.nrrd")


def file_suffix(path: str | Path) -> str:
    """The file's ending in lower case, '.nii.gz' and '.seg.nrrd' kept whole; '' when it has none."""
    name = Path(path).name.lower()
    for ending in DOUBLE_SUFFIXES:
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def strip_suffix(path: str | Path) -> str:
    """The file name without its (possibly double) ending: 'liver_001.nii.gz' -> 'liver_001'."""
    name = Path(path).name
    ending = file_suffix(name)
    return name[: len(name) - len(ending)] if ending else name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _named_for(exc: OSError, tmp: Path, destination: Path) -> OSError:
    """``exc`` with a file name inside the temporary ``tmp`` shown at ``destination`` instead."""
    name = exc.filename
    if name is None:
        return exc
    try:
        inside = Path(os.fsdecode(name)).relative_to(tmp)
    except ValueError:
        return exc
    shown = destination if str(inside) == "." else destination / inside
    renamed = OSError(exc.errno, exc.strerror or str(exc), str(shown))  # errno picks the subclass
    renamed.__traceback__ = exc.__traceback__
    return renamed


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` with Python's own I/O: a full disk is an ``OSError`` (ENOSPC) naming ``path``."""
    path = Path(path)
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        if exc.filename is None:  # a failed write or close names no file
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written by :func:`write_bytes` (a full disk is an ``OSError``)."""
    from safetensors.torch import save

    write_bytes(path, save(tensors, metadata=metadata))


def save_torch(path: str | Path, obj: Any) -> None:
    """A ``torch.save`` file (state of plain tensors and numbers), written by :func:`write_bytes`."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def _public(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give outputs the usual umask permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.",
        suffix=suffix if suffix is not None else path.suffix or ".tmp",
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            _public(tmp_path)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        renamed = _named_for(exc, tmp_path, path)
        if renamed is exc:
            raise
        raise renamed from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; it replaces ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        _public(tmp, directory=True)
        for entry in tmp.rglob("*"):
            if entry.is_file() and not entry.stat().st_mode & 0o044:
                _public(entry)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "d")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        renamed = _named_for(exc, tmp, path)
        if renamed is exc:
            raise
        raise renamed from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
    return missing


class FileGroup:
    """Files written together: see :func:`atomic_files`."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._made: list[Path] = []

    def path(self, destination: str | Path) -> Path:
        """A temporary file next to ``destination`` to write it into (its name ends like it)."""
        destination = Path(destination)
        self._made[:0] = _make_parents(destination.parent)
        fd, tmp = tempfile.mkstemp(prefix=".medsam3-", suffix=f"-{destination.name}", dir=destination.parent)
        os.close(fd)
        self._pending.append((Path(tmp), destination))
        return Path(tmp)

    def _commit(self) -> list[Path]:
        for tmp, _ in self._pending:
            if tmp.exists():
                _public(tmp)
        moved = []
        for tmp, destination in self._pending:
            os.replace(tmp, destination)
            moved.append(destination)
        self._pending = []
        return moved

    def _abort(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []
        for folder in self._made:  # deepest first; only folders this group created, and only if empty
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def atomic_files() -> Iterator[FileGroup]:
    """Write several files as one: every file goes to a temporary next to its destination, and all
    are moved into place (in the order they were asked for) only when the block succeeds.

    On any failure (a full disk, an exception) the temporaries and the folders this group created
    are removed, so earlier files at the destinations stay byte for byte as they were::

        with atomic_files() as files:
            save_png(files.path(out / "mask.png"), mask)
            write_json_atomic(files.path(out / "result.json"), result)   # moved last
    """
    group = FileGroup()
    try:
        yield group
        group._commit()
    except BaseException:
        group._abort()
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any, *, allow_nan: bool = True) -> None:
    """Write pretty JSON atomically (sorted keys off: the caller's order reads better).

    ``allow_nan=False`` refuses NaN and infinity (bare ``NaN``/``Infinity`` are not valid JSON).
    """
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=allow_nan) + "\n")


_TEMPORARY = re.compile(r"\.{1,2}medsam3-\w+?-(?P<name>[^/\\]+?)(?:\.\w{8}\.\w+)?$")  # FileGroup's names


def describe_os_error(exc: OSError) -> str:
    """'PATH: reason' for an OSError (a permission problem, a full disk), temporary names made readable."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    names = [n for n in (exc.filename, getattr(exc, "filename2", None)) if n is not None]
    shown = [_TEMPORARY.sub(r"\g<name>", os.fsdecode(n)) for n in names]
    return f"{' -> '.join(shown)}: {reason}" if shown else reason
