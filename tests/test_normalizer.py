"""The offline concept normaliser with the real all-MiniLM-L6-v2 encoder, measured on a held synonym list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsam3.data.vocabulary import clean_phrase
from medsam3.errors import PromptError
from medsam3.model.concepts import (
    Candidate,
    ConceptNormalizer,
    default_normalizer,
    normalize_prompt,
    normalizer_for,
    sentence_encoder,
)

HELD = Path(__file__).parent / "data" / "synonyms.tsv"

# The concepts of the paper's 2D and 3D datasets plus nearby organs, so that wrong answers are possible
# and plausible ("liver" vs "liver tumor", "optic cup" vs "optic disc", "kidney" vs "kidney tumor").
VOCABULARY = [
    "lung infection", "cell nucleus", "breast tumor", "optic cup", "optic disc", "skin lesion",
    "retinal artery", "retinal vein", "polyp", "pulmonary artery", "liver", "liver tumor", "prostate",
    "stroke lesion", "kidney", "kidney tumor", "brain tumor", "lung nodule", "lung", "pancreas",
    "spleen", "gallbladder", "heart", "colon",
]  # fmt: skip

# Synonyms a vocabulary might list. None of them is a held phrase (asserted below), so the measured
# accuracy is about generalisation, not look-up.
SYNONYMS = {
    "liver tumor": ["liver lesion", "hepatic tumor", "liver metastasis"],
    "liver": ["hepatic organ"],
    "breast tumor": ["breast nodule", "breast carcinoma"],
    "cell nucleus": ["nucleus", "cell"],
    "polyp": ["colonic polyp", "adenomatous polyp"],
    "skin lesion": ["skin cancer", "naevus", "mole"],
    "optic cup": ["cup"],
    "kidney tumor": ["renal tumor", "renal cell carcinoma", "kidney lesion"],
    "kidney": ["renal organ"],
    "stroke lesion": ["infarct core", "ischemic lesion"],
    "lung infection": ["covid lesion", "lung opacity"],
}


def held_pairs() -> list[tuple[str, str]]:
    pairs = []
    for line in HELD.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            phrase, concept = line.split("\t")
            pairs.append((phrase, concept))
    return pairs


@pytest.fixture(scope="module")
def normalizer() -> ConceptNormalizer:
    return ConceptNormalizer(VOCABULARY, SYNONYMS)


def accuracy(norm: ConceptNormalizer, pairs: list[tuple[str, str]]) -> tuple[float, list[str]]:
    misses = []
    answers = norm.normalize_many([p for p, _ in pairs], top_k=1)
    for (phrase, concept), (got,) in zip(pairs, answers, strict=True):
        if got.concept != concept:
            misses.append(f"{phrase!r} -> {got.concept!r} ({got.similarity:.2f}), want {concept!r}")
    return 1 - len(misses) / len(pairs), misses


def test_held_list_is_large_valid_and_disjoint_from_synonyms():
    pairs = held_pairs()
    assert len(pairs) >= 40
    assert {c for _, c in pairs} <= set(VOCABULARY)
    listed = {clean_phrase(s) for group in SYNONYMS.values() for s in group}
    assert not listed & {clean_phrase(p) for p, _ in pairs}
    assert not {clean_phrase(c) for c in VOCABULARY} & {clean_phrase(p) for p, _ in pairs}


def test_accuracy_on_held_synonyms(normalizer, capsys):
    pairs = held_pairs()
    with_syn, misses = accuracy(normalizer, pairs)
    plain, plain_misses = accuracy(ConceptNormalizer(VOCABULARY, None, encoder=normalizer.encoder), pairs)
    with capsys.disabled():
        print(
            f"\nnormaliser accuracy on {len(pairs)} held pairs: {with_syn:.3f} with synonyms, "
            f"{plain:.3f} embedding only; misses: {misses}"
        )
    assert with_syn >= 0.9, misses
    assert plain >= 0.85, plain_misses


def test_phrase_in_vocabulary_maps_to_itself(normalizer):
    cands = normalizer.normalize("Breast Tumour", top_k=3)
    assert cands[0] == Candidate("breast tumor", 1.0, "exact")
    assert len(cands) == 3 and all(c.via == "embedding" for c in cands[1:])
    assert [c.concept for c in cands] == [c.concept for c in normalizer.normalize_many(["breast tumor"])[0]]
    np.testing.assert_allclose(
        normalizer.similarity_matrix(["hepatic lesion", "glioma"])[1],
        normalizer.similarities("glioma"),
        atol=1e-5,
    )
    assert cands[1].similarity >= cands[2].similarity
    assert "breast tumor" in normalizer and "breast nodule" not in normalizer


def test_listed_synonym_maps_with_full_similarity(normalizer):
    assert normalizer.best("renal cell carcinoma") == Candidate("kidney tumor", 1.0, "synonym")


def test_embedding_candidates_are_ranked_and_bounded(normalizer):
    cands = normalizer.normalize("hepatic lesion", top_k=5)
    assert [c.via for c in cands] == ["embedding"] * 5
    sims = [c.similarity for c in cands]
    assert sims == sorted(sims, reverse=True)
    assert cands[0].concept == "liver tumor" and 0.5 < sims[0] < 1.0
    assert len({c.concept for c in cands}) == 5


def test_instructions_and_plurals_find_their_concept(normalizer):
    assert normalizer.best("Please segment the liver tumor in this CT slice") == Candidate(
        "liver tumor", 1.0, "exact"
    )
    assert normalizer.best("Segment the polyps") == Candidate("polyp", 1.0, "exact")
    assert normalizer.best("find every cell in the picture") == Candidate("cell nucleus", 1.0, "synonym")
    # No concept named outright: the encoder decides, and "liver" (a word of it) must not win.
    cands = normalizer.normalize("outline the tumour in the liver on this scan", top_k=2)
    assert [c.concept for c in cands] == ["liver tumor", "liver"] and cands[0].via == "embedding"
    assert cands[0].similarity > cands[1].similarity


def test_embeddings_are_unit_length_and_meaningful():
    enc = sentence_encoder()
    assert sentence_encoder() is enc  # cached per process
    emb = enc.encode(["liver tumor", "hepatic lesion", "The weather is nice today"])
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > 0.6 > 0.2 > emb[0] @ emb[2]


def test_bad_input_is_refused(normalizer):
    with pytest.raises(PromptError, match="nothing to normalise"):
        normalizer.normalize("  ?! ")
    with pytest.raises(PromptError, match="top_k"):
        normalizer.normalize("polyp", top_k=0)
    with pytest.raises(PromptError, match="at least one concept"):
        ConceptNormalizer([])


def test_normalize_prompt_for_segment(normalizer):
    same = normalize_prompt("polyp", normalizer)
    assert (same.used, same.changed, same.via, same.similarity) == ("polyp", False, "exact", 1.0)
    assert normalize_prompt("Breast  Tumour", normalizer).used == "breast tumor"
    mapped = normalize_prompt("tumour of the kidney", normalizer)
    assert mapped.changed and mapped.used == "kidney tumor" and mapped.via == "embedding"
    assert mapped.to_json()["candidates"][0]["concept"] == "kidney tumor" and len(mapped.candidates) == 3
    far = normalize_prompt("the weather is nice today", normalizer)
    assert far.used == "the weather is nice today" and not far.changed and far.via is None
    assert far.similarity < 0.35


def test_bundled_vocabulary_and_adapter_concepts():
    bundled = default_normalizer()
    assert "breast tumor" in bundled.vocabulary and bundled.best("hepatic lesion").concept == "liver tumor"
    assert bundled.best("Segment the polyps in this colonoscopy frame") == Candidate("polyp", 1.0, "exact")
    adapter = normalizer_for(["breast tumor", "polyp"])  # an adapter tuned on two concepts
    assert (
        adapter.vocabulary == ["breast tumor", "polyp"] and "breast mass" in adapter.synonyms["breast tumor"]
    )
    assert adapter.best("melanoma").concept in {"breast tumor", "polyp"}  # only its own concepts
    assert normalize_prompt("tumour in the breast", adapter).used == "breast tumor"
