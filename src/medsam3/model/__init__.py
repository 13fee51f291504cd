"""Build and load SAM 3 for MedSAM-3: presets, checkpoints, adapters, parameter policies."""

from medsam3.model.loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
