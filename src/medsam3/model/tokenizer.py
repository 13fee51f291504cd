"""An offline CLIP BPE tokenizer for SAM 3's text encoder.

SAM 3 uses OpenAI CLIP's byte-level BPE (49,408 tokens, 32-token context). The merges ship in
``assets/bpe_simple_vocab_16e6.txt.gz``, the vocabulary file taken unchanged from the
``open-clip-torch`` wheel on PyPI (see ``scripts/vendor_clip_vocab.py``). From it we derive the
vocabulary and merge list that transformers' ``CLIPTokenizer`` takes, so no tokenizer is ever
fetched from a hub at run time.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

CONTEXT_LENGTH = 32
VOCAB_SIZE = 49408
_NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_vocab_and_merges(bpe_gz: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """Build CLIP's token -> id table and merge list from the BPE merges file."""
    if bpe_gz is None:
        bpe_gz = Path(str(resources.files("medsam3.model") / "assets" / "bpe_simple_vocab_16e6.txt.gz"))
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    symbols = list(_byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {tok: i for i, tok in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=1)
def build_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer equivalent to ``openai/clip-vit-base-patch32``'s, built offline."""
    vocab, merges = clip_vocab_and_merges()
    merge_pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=merge_pairs, model_max_length=CONTEXT_LENGTH)
