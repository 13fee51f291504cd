"""medsam3: segment anything in medical images by naming it.

MedSAM-3 is SAM 3 (Meta's Promptable Concept Segmentation model) with frozen image and text
encoders and a detector fine-tuned on medical images paired with short concept phrases.
"""

__version__ = "0.1.0"
