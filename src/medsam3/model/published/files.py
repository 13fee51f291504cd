"""Read tensor files without ever unpickling Python objects, and fingerprint them."""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from medsam3.errors import ModelSpecError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes (what a user compares with the hub's listing)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pickle_refusal(path: Path, exc: Exception) -> ModelSpecError:
    found = re.search(r"(?:Unsupported global|GLOBAL)[:\s]+(?:GLOBAL\s+)?([\w.]+)", str(exc))
    what = f" (it holds a {found.group(1)})" if found else ""
    return ModelSpecError(
        f"{path}: refusing to unpickle it: the file holds Python objects beyond tensors{what}; "
        "only plain tensor files are loaded (torch.load weights_only=True or safetensors)"
    )


def read_tensor_file(path: str | Path) -> dict:
    """The top-level object of a ``torch.save`` file (tensors, dicts, numbers only) or a safetensors file.

    ``torch.load(weights_only=True)`` refuses any other Python object before building it, so
    nothing in the file is executed; that refusal becomes one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise ModelSpecError(f"{path}: not a readable safetensors file ({exc})") from exc
    mmap = zipfile.is_zipfile(path)  # the zip format maps tensors lazily: a 10 GB trainer file fits
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _pickle_refusal(path, exc) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelSpecError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:160]})") from exc
    if not isinstance(loaded, dict):
        raise ModelSpecError(f"{path}: expected a dict of tensors, the file holds a {type(loaded).__name__}")
    return loaded
