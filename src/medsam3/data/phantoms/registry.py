"""The phantom kinds by name, and ``generate``: n deterministic cases of one kind."""

from __future__ import annotations

from medsam3.data.phantoms import ct, ct3d, dermoscopy, endoscopy, nuclei, ultrasound, video
from medsam3.data.phantoms.common import PhantomCase, PhantomKind, case_rng
from medsam3.errors import DatasetError

KINDS: dict[str, PhantomKind] = {
    k.name: k
    for k in (nuclei.KIND, ultrasound.KIND, ct.KIND, endoscopy.KIND, dermoscopy.KIND, ct3d.KIND, video.KIND)
}
MIN_SIZE = 32
MAX_SIZE = 1024  # a ct3d phantom of this side is already ~100 MB per case
MAX_CASES = 100_000
MAX_SEED = 2**32 - 1


def get_kind(name: str) -> PhantomKind:
    """The kind called ``name``, or a one-line error listing the known kinds."""
    try:
        return KINDS[name]
    except KeyError:
        raise DatasetError(
            f"unknown phantom kind '{name}': choose one of {', '.join(KINDS)} (or 'all')"
        ) from None


def check_size(kind: PhantomKind, size: int | None) -> int:
    """The image size to use: the kind's default, or ``size`` if it is usable."""
    size = kind.default_size if size is None else int(size)
    if size < MIN_SIZE:
        raise DatasetError(f"phantom size {size} px is too small: use at least {MIN_SIZE}")
    if size > MAX_SIZE:
        raise DatasetError(f"phantom size {size} px is too large: use at most {MAX_SIZE}")
    if kind.layout == "video" and size % 2:
        raise DatasetError(f"video phantoms need an even size (H.264 4:2:0), got {size}")
    return size


def check_settings(kind: PhantomKind, n: int, seed: int, size: int | None) -> int:
    """Refuse a case count, seed or size that cannot be generated; returns the size to use."""
    if not 1 <= n <= MAX_CASES:
        raise DatasetError(f"number of phantom cases must be at least 1 and at most {MAX_CASES}, got {n}")
    if not 0 <= seed <= MAX_SEED:
        raise DatasetError(f"phantom seed must be 0..{MAX_SEED}, got {seed}")
    return check_size(kind, size)


def generate(kind: str, n: int, seed: int = 0, size: int | None = None) -> list[PhantomCase]:
    """``n`` cases of ``kind``; case ``i`` depends only on (kind, seed, i, size), not on ``n``."""
    spec = get_kind(kind)
    size = check_settings(spec, n, seed, size)
    cases = []
    for i in range(n):
        case = spec.make(case_rng(spec.name, seed, i), size)
        case.case_id = f"{spec.name}_{i:03d}"
        cases.append(case)
    return cases
