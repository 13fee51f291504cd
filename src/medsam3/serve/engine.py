"""The one model of a server, shared by every request and job, one call at a time.

The model is not thread-safe, so every model call (a vision encode, a detector pass) takes
:attr:`SharedModel.lock`; waiting for it is bounded by the caller's deadline, which is how the
per-request time limit holds while a volume job is running (jobs take the lock per slice, not per
volume). Vision features are cached by image content (LRU, bounded in bytes): a new prompt on an
uploaded image, or a second job on a volume, does not run the encoder again.

:class:`ModelView` gives each request or job :class:`~medsam3.infer.predictor.Sam3Predictor`'s
interface (``set_image`` / ``predict``) over the shared model, so the library's own 2D and volume
code runs unchanged on top of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from medsam3.data.windowing import as_rgb_uint8
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Prompt, PromptResult, as_prompts
from medsam3.model.loading import LoadedModel
from medsam3.serve.http_errors import ApiError
from medsam3.serve.lru import ByteLRU
from medsam3.serve.settings import ServeSettings

# Distinct phrases whose text features may stay cached before the cache is cleared (clients can
# send any number of phrases; the model's own text cache is unbounded).
MAX_CACHED_PHRASES = 512


class Stopped(Exception):
    """A job was cancelled, or ran past its time limit, between two model calls."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def feature_key(rgb: np.ndarray) -> str:
    """What identifies an image's features: its pixels (and shape)."""
    digest = hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=20)
    digest.update(repr(rgb.shape).encode())
    return digest.hexdigest()


def _tensor_bytes(value) -> int:
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return int(value.numel() * value.element_size())
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if hasattr(value, "last_hidden_state"):  # a vision encoder output
        return sum(_tensor_bytes(getattr(value, name, None))
                   for name in ("last_hidden_state", "fpn_hidden_states", "fpn_position_encoding"))  # fmt: skip
    return 0


def feature_bytes(encoded) -> int:
    """Memory held by one encoded image (the image tower's output and the detector's FPN levels)."""
    return _tensor_bytes(getattr(encoded, "embedding", None)) + _tensor_bytes(getattr(encoded, "vision", None))


class SharedModel:
    """The loaded model, one predictor over it, the lock around both, and the feature cache."""

    def __init__(self, loaded: LoadedModel, settings: ServeSettings):
        self.loaded = loaded
        self.settings = settings
        self.lock = threading.Lock()
        self.features = ByteLRU(settings.max_feature_bytes)
        self.predictor = Sam3Predictor(
            loaded, score_threshold=settings.score_threshold, mask_threshold=settings.mask_threshold
        )
        self._phrases: set[str] = set()
        self.encodes = 0
        self.detector_calls = 0

    @property
    def concepts(self) -> list[str]:
        return list(self.loaded.concepts)

    @contextlib.contextmanager
    def turn(self, deadline: float | None) -> Iterator[None]:
        """Hold the model; waiting past ``deadline`` (time.monotonic) is a 503 with Retry-After."""
        timeout = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.lock.acquire(timeout=timeout):
            raise ApiError(
                503,
                "the model is busy and the request ran out of time waiting for it; try again",
                headers={"Retry-After": "5"},
            )
        try:
            yield
        finally:
            self.lock.release()

    def _bound_text_cache(self, phrases: Sequence[str]) -> None:
        new = set(phrases) - self._phrases
        if len(self._phrases) + len(new) > MAX_CACHED_PHRASES:
            seam = getattr(self.loaded, "seam", None)
            if seam is not None:
                seam.clear_text_cache()
            self._phrases = set()
        self._phrases |= new

    def encode(self, rgb: np.ndarray):
        """``rgb`` through the image encoder (call inside :meth:`turn`)."""
        encoded = self.predictor.encode([rgb])[0]
        self.encodes += 1
        return encoded

    def predict(self, encoded, prompts: list[Prompt], **options) -> list[PromptResult]:
        """Every prompt on the encoded image (call inside :meth:`turn`)."""
        self._bound_text_cache([p.text for p in prompts])
        self.predictor.set_encoded(encoded)
        self.detector_calls += 1
        return self.predictor.predict(prompts, **options)

    def draw_boxes(self, encoded, boxes, mask_logits=None):
        """The box decoder alone on the encoded image (call inside :meth:`turn`): 3D propagation."""
        self.predictor.set_encoded(encoded)
        return self.predictor.draw_boxes(boxes, mask_logits=mask_logits)

    def view(
        self, owner: str, *, deadline: float | None = None, stop: Callable[[], str | None] | None = None
    ) -> ModelView:
        return ModelView(self, owner, deadline=deadline, stop=stop)

    def forget(self, owner: str) -> None:
        """Drop the cached features first stored for ``owner`` (an evicted session)."""
        self.features.pop_where(lambda _key, entry: entry[1] == owner)

    def stats(self) -> dict:
        return {
            "encodes": self.encodes,
            "detector_calls": self.detector_calls,
            "cached_features": len(self.features),
            "cached_feature_bytes": self.features.nbytes,
        }


class ModelView:
    """``set_image`` / ``predict`` for one request or job, over the shared model.

    ``stop()`` returning a reason (cancelled, out of time) ends a job between model calls with
    :class:`Stopped`; a request's ``deadline`` bounds how long it waits for the model.
    """

    def __init__(self, shared: SharedModel, owner: str, *, deadline: float | None, stop):
        self.shared = shared
        self.owner = owner
        self.deadline = deadline
        self.stop = stop
        self.loaded = shared.loaded
        self.score_threshold = shared.settings.score_threshold
        self.mask_threshold = shared.settings.mask_threshold
        self.encode_count = 0
        self._encoded = None

    def _check(self) -> None:
        reason = self.stop() if self.stop is not None else None
        if reason:
            raise Stopped(reason)

    def set_image(self, image: np.ndarray) -> bool:
        """Use ``image``'s features, encoding it only when they are not cached. Returns whether it encoded."""
        self._check()
        rgb = as_rgb_uint8(image)
        key = feature_key(rgb)
        entry = self.shared.features.get(key)
        fresh = entry is None
        if fresh:
            with self.shared.turn(self.deadline):
                encoded = self.shared.encode(rgb)
            self.shared.features.put(key, (encoded, self.owner), feature_bytes(encoded))
            self.encode_count += 1
        else:
            encoded = entry[0]
        self._encoded = encoded
        return fresh

    def predict(self, prompts: Sequence[Prompt | str], **options) -> list[PromptResult]:
        self._check()
        if self._encoded is None:
            raise RuntimeError("set_image() before predict()")
        prompts = as_prompts(prompts)
        with self.shared.turn(self.deadline):
            return self.shared.predict(self._encoded, prompts, **options)

    def predict_one(self, prompt: Prompt | str, **options) -> PromptResult:
        return self.predict([prompt], **options)[0]

    @property
    def seam(self):
        return self.shared.predictor.seam

    def draw_boxes(self, boxes, mask_logits=None):
        """The box decoder on the current image (volume propagation), under the model lock."""
        self._check()
        if self._encoded is None:
            raise RuntimeError("set_image() before draw_boxes()")
        with self.shared.turn(self.deadline):
            return self.shared.draw_boxes(self._encoded, boxes, mask_logits)
