"""The concept vocabulary: canonical phrases, synonym look-up, and the three-word rule."""

from __future__ import annotations

import pytest

from medsam3.data import vocabulary as vocab
from medsam3.errors import PromptError


def test_papers_dataset_phrases():
    assert vocab.dataset_concepts("BUSI") == ["breast tumor"]
    assert vocab.dataset_concepts("Kvasir-SEG") == ["polyp"]
    assert vocab.dataset_concepts("ISIC2018") == ["skin lesion"]
    assert vocab.dataset_concepts("dsb2018") == vocab.dataset_concepts("MoNuSeg") == ["cell nucleus"]
    assert vocab.dataset_concepts("RIM-ONE") == ["optic cup", "optic disc"]
    assert vocab.dataset_concepts("COVID-QU-Ex") == ["lung", "lung infection"]
    assert vocab.dataset_concepts("pyradiomics") == ["brain tumor", "breast lesion", "lung tumor"]
    assert vocab.dataset_concepts("no such set") == []


def test_every_canonical_phrase_is_short_lower_case_and_listed_once():
    for concept in vocab.all_concepts():
        assert concept == concept.lower().strip()
        assert 1 <= len(concept.split()) <= vocab.MAX_WORDS, concept
        assert vocab.canonical(concept) == concept
    for dataset, concepts in vocab.DATASET_CONCEPTS.items():
        for concept in concepts:
            assert concept in vocab.CONCEPTS, f"{dataset}: {concept} is not a canonical concept"
    for mapping in vocab.DATASET_LABEL_NAMES.values():
        assert set(mapping.values()) <= set(vocab.CONCEPTS)


def test_no_synonym_points_at_two_concepts():
    owner: dict[str, str] = {}
    for concept, words in vocab.CONCEPTS.items():
        for word in [concept, *words]:
            key = vocab.match_key(word)
            assert owner.setdefault(key, concept) == concept, f"'{word}' names {owner[key]} and {concept}"


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("Breast Tumour", "breast tumor"),
        ("  breast   tumors ", "breast tumor"),
        ("nuclei", "cell nucleus"),
        ("Cell Nuclei", "cell nucleus"),
        ("polyps", "polyp"),
        ("optic disk", "optic disc"),
        ("Lungs", "lung"),
        ("liver lesions", "liver tumor"),
        ("pancreas", "pancreas"),  # must not be 'singularised' to 'pancrea'
        ("kidneys", "kidney"),
        ("tumor in the breast", "breast tumor"),
        ("hepatic lesion", "liver tumor"),
        ("spaceship", None),
    ],
)
def test_canonical_lookup(phrase, expected):
    assert vocab.canonical(phrase) == expected


def test_synonym_table_is_a_copy_and_matches_registry():
    table = vocab.synonyms()
    assert table["cell nucleus"] == vocab.CONCEPTS["cell nucleus"]
    table["cell nucleus"].append("junk")
    assert "junk" not in vocab.CONCEPTS["cell nucleus"]
    assert list(table) == vocab.all_concepts()
    assert "nuclei" in vocab.synonyms_of("Nuclei")
    assert vocab.synonyms_of("spaceship") == []


def test_check_phrase_enforces_three_words():
    assert vocab.check_phrase("  Breast   Tumor ") == "breast tumor"
    assert vocab.check_phrase("non-enhancing tumor core") == "non-enhancing tumor core"  # 3 words
    with pytest.raises(PromptError, match="4 words.*at most 3"):
        vocab.check_phrase("tumor in the breast")
    with pytest.raises(PromptError, match="breast tumor"):  # the message suggests the known phrase
        vocab.check_phrase("tumor in the breast")
    assert vocab.check_phrase("tumor in the breast", allow_long=True) == "tumor in the breast"
    for empty in ("", "   ", "!!"):
        with pytest.raises(PromptError, match="empty"):
            vocab.check_phrase(empty)


def test_label_names_become_concepts_within_their_dataset():
    assert vocab.concept_for_label("cancer", "Task03_Liver") == "liver tumor"
    assert vocab.concept_for_label("cancer", "Dataset007_Pancreas") == "pancreatic tumor"
    assert vocab.concept_for_label("Tumour", "Task08_HepaticVessel") == "liver tumor"
    assert vocab.concept_for_label("PZ", "Task05_Prostate") == "prostate peripheral zone"
    assert vocab.concept_for_label("liver") == "liver"
    assert vocab.concept_for_label("Left_Kidney") == "left kidney"  # unknown: cleaned label name
    assert vocab.concept_for_label("nuclei") == "cell nucleus"
    assert vocab.dataset_key("Task01_BrainTumour") == "msd-braintumour"
    assert vocab.dataset_key("BRATS") == "msd-braintumour"
