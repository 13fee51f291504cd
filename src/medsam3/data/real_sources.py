"""Pinned, checksummed sources of the real labelled sets: a PyPI wheel and a Debian package.

:mod:`medsam3.data.examples` already fetches stardist 0.9.2 and the pyradiomics 3.0.1 sdist; this
module adds the two brain sources, each pinned to one version and every file used checked by
SHA-256 before use:

- ``nilearn==0.14.1`` (PyPI wheel, BSD-3-Clause), fetched with ``pip download --no-deps``: the
  MNI152 2009a symmetric template, ``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_
  converted.nii.gz`` (197x233x189 voxels of 1 mm; T1 and gray/white-matter probability maps).
- Debian ``mricron-data=1.2.20211006+dfsg-4`` (bookworm, ``all``), fetched with ``apt-get download``
  and read in Python (no ``dpkg -x``): ``JHU-WhiteMatter-labels-1mm.nii.gz`` and its ``.nii.txt``
  (48 tract labels in FSL's MNI152 space, 182x218x182). The ``.deb`` itself is checksummed too.

**Reserved files.** The same Debian package ships the Colin27 brain (``ch2.nii.gz``,
``ch2bet.nii.gz``, ``ch2better.nii.gz``) and the atlases drawn on it (``aal.nii.gz``,
``brodmann.nii.gz``). They are kept for an independent evaluation, so nothing here reads, stores or
extracts them (nor their ``.txt``/``.lut`` companions): :func:`read_deb_members` refuses to be asked
for them and hands the tar reader only the names it was asked for. The xz stream is necessarily
decompressed in passing over the members that precede a wanted one, but their bytes are never read.

Archives are kept in the cache shared with ``fetch-examples`` (``$MEDSAM3_CACHE/examples``), so a
second build needs no network.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medsam3.data.examples import ExampleDownloadError, Package
from medsam3.errors import InputFileError

_NILEARN_DATA = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
NILEARN = Package(
    spec="nilearn==0.14.1",
    # A pure-Python wheel; pin the interpreter tag so any Python can download it.
    pip_args=("--only-binary", ":all:", "--python-version", "3.11"),
    archive_glob="nilearn-0.14.1-py3-none-any.whl",
    files={
        _NILEARN_DATA.format("t1"): "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
        _NILEARN_DATA.format("gm"): "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
        _NILEARN_DATA.format("wm"): "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    },
)
NILEARN_T1, NILEARN_GM, NILEARN_WM = (_NILEARN_DATA.format(k) for k in ("t1", "gm", "wm"))


@dataclass(frozen=True)
class DebPackage:
    """A Debian package pinned to one version and checksum, and the data files used from it."""

    name: str
    version: str
    sha256: str
    files: dict[str, str]  # member path inside data.tar -> sha256 of its content

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"

    @property
    def filename(self) -> str:
        # apt writes an epoch-less version as is ("+" kept); the name is fixed by Debian policy.
        return f"{self.name}_{self.version}_all.deb"


_TEMPLATES = "./usr/share/mricron/templates/"
JHU_LABELS = _TEMPLATES + "JHU-WhiteMatter-labels-1mm.nii.gz"
JHU_NAMES = _TEMPLATES + "JHU-WhiteMatter-labels-1mm.nii.txt"
MRICRON_DATA = DebPackage(
    name="mricron-data",
    version="1.2.20211006+dfsg-4",
    sha256="d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f",
    files={
        JHU_LABELS: "eb5d1fc2905568f50073fbca05bc0bc0167397f6b6f43aaf9da3e0a17ca9a340",
        JHU_NAMES: "100c71b26490d8d19d2b107a729dab698f203b3d50b7c7d6ffd4059bc9b9cc5b",
    },
)

#: Files of mricron-data reserved for independent evaluation: never read, stored or extracted.
RESERVED_FILES = ("ch2.nii.gz", "ch2bet.nii.gz", "ch2better.nii.gz", "aal.nii.gz", "brodmann.nii.gz")
#: Their companions (names, colour tables) are left alone too: every name with these prefixes.
_RESERVED_PREFIXES = ("ch2.", "ch2bet.", "ch2better.", "aal.", "brodmann.")


def is_reserved(member: str) -> bool:
    """Whether a package member is one of the reserved Colin27 files (or a companion of one)."""
    base = member.rstrip("/").rsplit("/", 1)[-1].lower()
    return base in RESERVED_FILES or base.startswith(_RESERVED_PREFIXES)


_APT_NETWORK_SIGNS = (
    "Temporary failure resolving",
    "Could not resolve",
    "Unable to connect",
    "Could not connect",
    "Connection failed",
    "Connection timed out",
    "Network is unreachable",
    "No route to host",
    "Failed to fetch",
)


def apt_download(package: DebPackage, cache_dir: Path) -> Path:
    """The package's ``.deb`` in ``cache_dir`` (checksummed), fetched with ``apt-get download`` if absent."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / package.filename
    if target.is_file():
        check_deb(package, target)
        return target
    apt = shutil.which("apt-get")
    if apt is None:
        raise ExampleDownloadError(
            package.spec,
            f"apt-get is not available here; put {package.filename} (SHA-256 {package.sha256}) "
            f"from a Debian bookworm mirror into {cache_dir}",
            network=False,
        )
    with tempfile.TemporaryDirectory(prefix=".apt-", dir=cache_dir) as tmp:
        try:
            done = subprocess.run([apt, "download", package.spec], cwd=tmp, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise ExampleDownloadError(package.spec, "apt-get took more than 15 minutes", network=True) from None
        found = sorted(Path(tmp).glob(f"{package.name}_*.deb"))
        if done.returncode != 0 or not found:
            raise _apt_error(package, done.stdout + done.stderr)
        os.replace(found[0], target)
    check_deb(package, target)
    return target


def _apt_error(package: DebPackage, output: str) -> ExampleDownloadError:
    if any(sign in output for sign in _APT_NETWORK_SIGNS):
        return ExampleDownloadError(package.spec, "the Debian mirror is unreachable (offline? proxy?)", network=True)
    if "Unable to locate package" in output or "was not found" in output or "has no installation" in output:
        return ExampleDownloadError(
            package.spec,
            f"apt does not know {package.spec} (run `apt-get update` first; the pin is Debian bookworm's)",
            network=False,
        )
    errors = [line.strip() for line in output.splitlines() if line.strip().startswith("E:")]
    last = errors[-1] if errors else (output.strip().splitlines() or ["apt-get gave no output"])[-1]
    return ExampleDownloadError(package.spec, last[:300], network=False)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_deb(package: DebPackage, path: Path) -> None:
    """Refuse (and drop) a cached ``.deb`` whose SHA-256 is not the pinned one."""
    digest = sha256_file(path)
    if digest != package.sha256:
        path.unlink(missing_ok=True)
        raise InputFileError(
            path, f"SHA-256 {digest[:12]}..., expected {package.sha256[:12]}... for {package.spec}; removed"
        )


def _ar_members(data: bytes, path: Path) -> dict[str, bytes]:
    """The members of a Debian ``ar`` archive (``debian-binary``, ``control.tar.*``, ``data.tar.*``)."""
    if not data.startswith(b"!<arch>\n"):
        raise InputFileError(path, "not a Debian package (no ar header)")
    members: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        try:
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise InputFileError(path, f"corrupt ar member header at byte {pos}") from None
        pos += 60
        members[name] = data[pos : pos + size]
        pos += size + (size % 2)
    return members


def read_deb_members(package: DebPackage, deb: Path) -> dict[str, bytes]:
    """The package's wanted data files, by member path, each checked against its SHA-256.

    Only the members named in ``package.files`` are read; asking for a reserved one is refused.
    """
    reserved = sorted(name for name in package.files if is_reserved(name))
    if reserved:
        raise ValueError(f"refusing to read reserved evaluation files {', '.join(reserved)}")
    wanted = set(package.files)
    members = _ar_members(deb.read_bytes(), deb)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise InputFileError(deb, "Debian package without data.tar")
    mode = {"data.tar.xz": "r:xz", "data.tar.gz": "r:gz", "data.tar.bz2": "r:bz2", "data.tar": "r:"}.get(data_name)
    if mode is None:
        raise InputFileError(deb, f"{data_name}: compression not readable here (need xz, gz or bz2)")
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode=mode) as tf:
            for member in tf:
                if member.name in wanted and member.isfile():
                    handle = tf.extractfile(member)
                    if handle is not None:
                        found[member.name] = handle.read()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, OSError) as exc:
        deb.unlink(missing_ok=True)
        raise InputFileError(deb, f"cannot read the cached package ({exc}); it was removed, run again") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise InputFileError(deb, f"package lacks {', '.join(missing)}")
    for name in sorted(package.files):
        digest = hashlib.sha256(found[name]).hexdigest()
        if digest != package.files[name]:
            deb.unlink(missing_ok=True)
            raise InputFileError(deb, f"{name} has SHA-256 {digest[:12]}..., expected {package.files[name][:12]}...")
    return found


def parse_label_names(text: str) -> dict[int, str]:
    """A MRIcron ``.nii.txt`` label list (``value<TAB>name`` per line) -> {value: name}."""
    names: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1].strip()
    return names
