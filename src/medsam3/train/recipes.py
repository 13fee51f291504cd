"""Committed, reproducible training recipes.

``nano``: a small bundled model for tests and offline use. A SAM 3-architecture network of 4.8 M parameters trained from
scratch (policy ``full``) on the project's synthetic phantoms, so that the toolkit segments
something meaningful offline, out of the box. It is a small model for using and testing the
toolkit, not SAM 3: it knows only the phantom concepts it was trained on.

``lite``: the default model. LiteMedSAM's pretrained medical image encoder and all-MiniLM-L6-v2,
both frozen, feeding a SAM 3 detector (with a small neck and text projection) that this project
trains with MedSAM-3's policy on the train splits of real labelled sets built from registry packages
(``medsam3 data fetch-real``) plus the phantoms.

One concept ("spleen") is held out of nano's and lite's training on purpose: the demo teaches it to nano with
MedSAM-3's own method (frozen encoders, detector fine-tuned) and shows Dice before and after.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from medsam3.data.dataset import open_dataset
from medsam3.data.phantoms import write_phantom_dataset
from medsam3.data.sample import Sample

NANO_KINDS = ("nuclei", "ultrasound", "ct", "endoscopy", "dermoscopy")
HELD_OUT_CONCEPT = "spleen"


class ConcatSamples(Sequence[Sample]):
    """Several datasets as one sequence of samples, optionally without some concepts."""

    def __init__(self, datasets: Sequence[Sequence[Sample]], exclude: set[str] = frozenset()):
        self.parts = []
        for dataset in datasets:
            refs = [i for i in range(len(dataset)) if _concept(dataset, i) not in exclude]
            self.parts.append((dataset, refs))
        self._offsets = []
        total = 0
        for _, refs in self.parts:
            self._offsets.append(total)
            total += len(refs)
        self._len = total

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += self._len
        for (dataset, refs), start in zip(reversed(self.parts), reversed(self._offsets)):
            if index >= start:
                return dataset[refs[index - start]]
        raise IndexError(index)


def _concept(dataset, index: int) -> str:
    ref = getattr(dataset, "ref", None)
    if ref is not None:
        return ref(index).concept
    return dataset[index].concept


def make_phantom_corpus(root: Path, n_per_kind: int, seed: int = 0, kinds: Sequence[str] = NANO_KINDS) -> list[Path]:
    """Write (or reuse) one nnU-Net-layout phantom dataset per kind under ``root``."""
    folders = []
    for kind in kinds:
        folder = root / kind
        meta = folder / "dataset.json"
        fresh = meta.is_file() and json.loads(meta.read_text()).get("medsam3", {}).get("n") == n_per_kind
        if not fresh:
            write_phantom_dataset(folder, kind, n=n_per_kind, seed=seed)
        folders.append(folder)
    return folders


def phantom_splits(folders: Sequence[Path], exclude: set[str] = frozenset()) -> dict[str, ConcatSamples]:
    """train / val / test sequences over every phantom dataset (the test split stays untouched)."""
    return {
        split: ConcatSamples([open_dataset(folder, split=split) for folder in folders], exclude)
        for split in ("train", "val", "test")
    }


# --- lite ---------------------------------------------------------------------------------------------

#: Real sets lite is pretrained on (train splits only; their test splits and the unseen-view sets
#: stay untouched), with how their masks become instances: tissue-like concepts are one region per
#: image, tumours and nuclei are countable objects.
LITE_REAL_SETS = {
    "mni-tissue": "semantic",
    "mni-tracts": "semantic",
    "radiomics-tumor": "components",
    "dsb-nuclei": "components",
}
LITE_PHANTOM_KINDS = NANO_KINDS
#: What lite trains on since the dense sets (medsam3.data.dense_sets): every non-test slice of the real
#: volumes under several intensity mappings (folder under the dense root), and the real sets that
#: have no dense version (folder under the real root).
LITE_DENSE_SETS = {
    "dense-mni-tissue": "semantic",
    "dense-mni-tracts": "semantic",
    "dense-radiomics-tumor": "components",
}
LITE_REAL_ONLY_SETS = {"dsb-nuclei": "components"}
#: Dense sets seen more than once per epoch in training: the real tumours are a few dozen positive
#: slices among thousands of samples, and the detector found them least often.
LITE_TRAIN_REPEATS = {"dense-radiomics-tumor": 2}


def lite_splits(
    real_root: Path, phantom_folders: Sequence[Path], exclude: set[str] = frozenset()
) -> dict[str, ConcatSamples]:
    """train / val / test over lite's real sets and phantoms (test splits are never trained on)."""
    splits = {}
    for split in ("train", "val", "test"):
        real = [open_dataset(real_root / name, split=split, instances=mode) for name, mode in LITE_REAL_SETS.items()]
        phantoms = [open_dataset(folder, split=split) for folder in phantom_folders]
        splits[split] = ConcatSamples([*real, *phantoms], exclude)
    return splits


def lite_dense_splits(
    dense_root: Path,
    real_root: Path,
    phantom_folders: Sequence[Path],
    exclude: set[str] = frozenset(),
    repeats: Mapping[str, int] = LITE_TRAIN_REPEATS,
) -> dict[str, ConcatSamples]:
    """train / val over the dense sets, the nuclei set and the phantoms (val carved from each by case hash).

    The real sets' test splits are not among them: the dense sets leave their slices out. Training
    repeats the dense sets named in ``repeats``; validation counts every sample once.
    """
    splits = {}
    for split in ("train", "val"):
        dense = []
        for name, mode in LITE_DENSE_SETS.items():
            dataset = open_dataset(dense_root / name, split=split, instances=mode)
            dense += [dataset] * (repeats.get(name, 1) if split == "train" else 1)
        real = [
            open_dataset(real_root / name, split=split, instances=mode) for name, mode in LITE_REAL_ONLY_SETS.items()
        ]
        phantoms = [open_dataset(folder, split=split) for folder in phantom_folders]
        splits[split] = ConcatSamples([*dense, *real, *phantoms], exclude)
    return splits
