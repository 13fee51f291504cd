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
    if kind.layout == "video" and size % 2:
        raise DatasetError(f"video phantoms need an even size (H.264 4:2:0), got {size}")
    return size


def generate(kind: str, n: int, seed: int = 0, size: int | None = None) -> list[PhantomCase]:
    """``n`` cases of ``kind``; case ``i`` depends only on (kind, seed, i, size), not on ``n``."""
    spec = get_kind(kind)
    size = check_size(spec, size)
    if n < 1:
        raise DatasetError(f"number of phantom cases must be at least 1, got {n}")
    cases = []
    for i in range(n):
        case = spec.make(case_rng(spec.name, seed, i), size)
        case.case_id = f"{spec.name}_{i:03d}"
        cases.append(case)
    return cases
