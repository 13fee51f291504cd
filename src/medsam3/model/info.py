"""What a model is made of: parameters per part under a policy, what is pretrained, where it came from."""

from __future__ import annotations

import os

from medsam3.model.components import count_parameters
from medsam3.model.loading import load_model
from medsam3.model.policy import apply_policy, check_policy


def describe_model(
    spec: str, policy: str = "paper", adapter: str | os.PathLike | None = None, towers: str | None = None
) -> str:
    """A printable report: the component table (total / trainable / frozen), preprocessing, provenance."""
    check_policy(policy)
    loaded = load_model(spec, device="cpu", adapter=adapter, towers=towers)
    if adapter is None:
        apply_policy(loaded.model, policy)
    used = loaded.adapter["policy"] if loaded.adapter else policy
    rows = [("component", "total", "trainable", "frozen")]
    rows += [(r.component, f"{r.total:,}", f"{r.trainable:,}", f"{r.frozen:,}") for r in count_parameters(loaded.model)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{spec}: backbone {loaded.backbone.name}, policy {used}"]
    for k, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0]), *(v.rjust(w) for v, w in zip(row[1:], widths[1:]))]))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    facts = loaded.backbone.preprocessing()
    lines.append(f"input {facts['image_size']} px; resize: {facts['resize']}; normalisation: {facts['normalisation']}")
    p = loaded.precision
    lines.append(f"towers {p.dtype} ({p.reason}), detector {str(loaded.seam.dtype).split('.')[-1]}; "
                 f"config fingerprint {loaded.fingerprint}")  # fmt: skip
    lines.append(f"image tower runs on {p.runtime} ({p.runtime_reason})")
    for source in loaded.backbone.provenance(loaded.model):
        state = "frozen, pretrained" if source.get("frozen") else "trained"
        lines.append(f"weights {source['part']}: {source['source']}" + (f" [{state}]" if "frozen" in source else ""))
    if loaded.concepts:
        lines.append("concepts: " + ", ".join(loaded.concepts))
    return "\n".join(lines)
