"""Pictures of an evaluation: Dice distribution per concept, and the worst cases with overlays.

Matplotlib is driven through its object API on an Agg canvas (no pyplot, no global backend switch),
so plotting works headless and never changes the caller's matplotlib state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from medsam3.evaluate.report import CaseRecord
from medsam3.utils.files import atomic_path

GT_COLOR = (40, 220, 80)
PRED_COLOR = (255, 60, 60)
THUMB_SIDE = 256


def plot_dice_distribution(records: Sequence[CaseRecord], path: str | Path, *, title: str = "") -> Path:
    """Box plot with every case as a dot, one column per concept (cases containing the concept)."""
    concepts = sorted({r.concept for r in records})
    values = [[r.dice for r in records if r.concept == c and r.n_gt > 0] for c in concepts]
    fig = Figure(figsize=(max(4.0, 1.4 * len(concepts) + 1.5), 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(1, len(concepts) + 1)
    shown = [v if v else [np.nan] for v in values]
    ax.boxplot(shown, positions=positions, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same run draws the same picture
    for x, v in zip(positions, values, strict=True):
        if v:
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(v)), v, s=12, alpha=0.6, color="tab:blue", zorder=3)
    ax.set_xticks(positions, [f"{c}\n(n={len(v)})" for c, v in zip(concepts, values, strict=True)])
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "Dice per case")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


@dataclass
class CaseView:
    """What the worst-case grid needs of one case: a thumbnail and the two union masks."""

    record: CaseRecord
    image: np.ndarray  # (h, w, 3) uint8
    gt: np.ndarray  # (h, w) bool
    pred: np.ndarray  # (h, w) bool


def _shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize(size, Image.Resampling.NEAREST)) > 0


def make_view(record: CaseRecord, image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> CaseView:
    """Shrink a case to at most ``THUMB_SIDE`` pixels a side, so keeping a few costs little memory."""
    height, width = image.shape[:2]
    scale = min(1.0, THUMB_SIDE / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        gt, pred = (_shrink_mask(m, size) for m in (gt, pred))
    return CaseView(record=record, image=np.ascontiguousarray(image), gt=gt.copy(), pred=pred.copy())


def render_worst_cases(views: Sequence[CaseView], path: str | Path, *, pairs_per_row: int = 2) -> Path:
    """Each case as two tiles, ground truth (green) then prediction (red), worst Dice first."""
    from medsam3.visualize import grid, overlay

    tiles, titles = [], []
    for v in sorted(views, key=lambda v: (v.record.dice, v.record.case)):
        r = v.record
        tiles.append(overlay(v.image, [v.gt], colors=[GT_COLOR]))
        titles.append(f"{r.case} · {r.concept}: truth ({r.n_gt})")
        tiles.append(overlay(v.image, [v.pred], colors=[PRED_COLOR]))
        titles.append(f"prediction ({r.n_pred}) Dice {r.dice:.3f}")
    picture = grid(tiles, ncols=2 * pairs_per_row, titles=titles, tile_size=(THUMB_SIDE, THUMB_SIDE))
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return Path(path)
