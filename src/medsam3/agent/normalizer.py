"""Moved: the concept normaliser is :mod:`medsam3.model.concepts`, its cleaner
:func:`medsam3.data.vocabulary.clean_phrase`.

Only these names stay here, because ``medsam3.serve.service`` still imports them from this module.
"""

from medsam3.data.vocabulary import clean_phrase
from medsam3.model.concepts import default_normalizer, normalizer_for

__all__ = ["clean_phrase", "default_normalizer", "normalizer_for"]
