"""``--loss KEY=VALUE`` from the command line to the fields of :class:`LossWeights`."""

from __future__ import annotations

import dataclasses
import math
import typing

from medsam3.errors import MedSAM3Error
from medsam3.train.losses import LossWeights


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(LossWeights)
    return {f.name: hints[f.name] for f in dataclasses.fields(LossWeights)}


def parse_loss_options(items: list[str]) -> dict:
    """["semantic_dice=0", "negatives_in_absent_images=true"] -> {field: typed value}; one clear line
    for an unknown key or a value of the wrong type."""
    types = _field_types()
    options: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise MedSAM3Error(f"--loss '{item}': expected KEY=VALUE, e.g. semantic_dice=0")
        if key not in types:
            raise MedSAM3Error(f"--loss '{item}': unknown loss option '{key}' (known: {', '.join(sorted(types))})")
        kind = types[key]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if args and len(args) < len(typing.get_args(kind)):  # "X | None": none/null, or an X
            if text.lower() in ("none", "null"):
                options[key] = None
                continue
            kind = args[0]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = text.lower() in ("true", "1", "yes")
            elif kind is int:
                value = int(text)
            elif kind is float:
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError
            else:
                value = text
        except ValueError:
            raise MedSAM3Error(f"--loss '{item}': '{key}' takes a {kind.__name__}, got '{text}'") from None
        options[key] = value
    return options
