"""Check our Meta -> transformers key table numerically against Meta's own SAM 3 code.

Builds Meta's ``Sam3Image`` (the ``sam3`` package, random weights, published 1008 px architecture)
on CPU, hands its state dict, as ``sam3.pt`` stores it (``detector.*``), to
:func:`medsam3.model.published.checkpoint.sam3_from_checkpoint`, then runs one image and one
phrase through both models and prints the largest differences of their outputs. A mapping error
(a swapped norm, a wrong third of a fused projection) shows as differences of order 1.

Needs Meta's package and its light dependencies, which the project does not install:

    pip install --no-deps sam3==0.1.4 einops iopath ftfy wcwidth portalocker
    python scripts/verify_meta_sam3_mapping.py --bpe PATH/bpe_simple_vocab_16e6.txt.gz

(``bpe_simple_vocab_16e6.txt.gz`` is in Meta's repository, ``sam3/assets/``; the wheel omits it.)
Takes a few minutes and ~10 GB of memory on CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode


class _CudaToCpu(TorchFunctionMode):
    """Meta's builder allocates a few tables with device='cuda'; on a CPU-only machine put them on CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "cuda" in str(kwargs.get("device", "")):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def outputs(mine, theirs: dict) -> dict:
    from sam3.model.box_ops import box_cxcywh_to_xyxy

    return {
        "pred_logits": (mine.pred_logits, theirs["pred_logits"].squeeze(-1)),
        "pred_boxes (xyxy)": (mine.pred_boxes, box_cxcywh_to_xyxy(theirs["pred_boxes"])),
        "presence_logits": (mine.presence_logits.reshape(-1), theirs["presence_logit_dec"].reshape(-1)),
        "pred_masks": (mine.pred_masks, theirs["pred_masks"]),
        "semantic_seg": (mine.semantic_seg, theirs["semantic_seg"]),
    }


def report(title: str, pairs: dict) -> None:
    print(f"== {title}")
    for name, (a, b) in pairs.items():
        a, b = a.float(), b.float()
        diff, scale = float((a - b).abs().max()), float(b.abs().max())
        print(f"  {name}: shape {tuple(a.shape)}; max |diff| {diff:.3e} (largest value {scale:.3e})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", required=True, type=Path, help="Meta's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--prompt", default="skin lesion")
    args = parser.parse_args()

    from sam3.model.sam3_image_processor import Sam3Processor as MetaProcessor
    from sam3.model_builder import build_sam3_image_model

    from medsam3.model.loading import offline_processor
    from medsam3.model.published.checkpoint import sam3_from_checkpoint

    torch.manual_seed(0)
    start = time.time()
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
    with _CudaToCpu():
        meta = build_sam3_image_model(
            bpe_path=str(args.bpe), device="cpu", load_from_HF=False, eval_mode=True, enable_inst_interactivity=False
        )
    with torch.no_grad():
        for tensor in meta.state_dict().values():
            if not tensor.is_floating_point():  # the ViT's complex RoPE tables
                continue
            # some of Meta's tables are left uninitialised (torch.empty) until a checkpoint loads
            if not bool(torch.isfinite(tensor).all()) or float(tensor.abs().max()) > 100:
                tensor.normal_(0.0, 0.02)
            tensor.add_(torch.randn_like(tensor) * 0.02)  # no norm left at 1/0: a swapped norm would show
    meta_state = {f"detector.{k}": v for k, v in meta.state_dict().items()}
    print(f"Meta's Sam3Image built: {len(meta_state)} tensors ({time.time() - start:.0f} s)")

    ours, provenance = sam3_from_checkpoint(meta_state, Path("meta-sam3-random/sam3.pt"))
    print("\n".join(provenance.lines()))

    image = torch.randint(0, 256, (3, 1008, 1008), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    processor = MetaProcessor(meta, device="cpu", confidence_threshold=0.0)
    tokenizer = offline_processor(1008).tokenizer
    tokens = tokenizer([args.prompt], padding="max_length", max_length=32, return_tensors="pt")
    box = torch.tensor([0.45, 0.5, 0.3, 0.4])  # cx, cy, w, h normalised: one positive exemplar box
    with torch.inference_mode():
        pixels = processor.transform(image).unsqueeze(0)
        backbone_out = meta.backbone.forward_image(pixels)
        backbone_out.update(meta.backbone.forward_text([args.prompt], device="cpu"))
        text = ours.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        vision = ours.get_vision_features(pixel_values=pixels)
        valid = int(tokens["attention_mask"].sum())
        towers = {
            "text features (valid tokens)": (
                text.pooler_output[0, :valid],
                backbone_out["language_features"][:valid, 0],
            )
        }
        for level, (a, b) in enumerate(zip(vision.fpn_hidden_states, backbone_out["backbone_fpn"], strict=False)):
            towers[f"FPN level {level}"] = (a, b)
        report("towers", towers)

        def meta_run(with_box: bool) -> dict:
            prompt = meta._get_dummy_prompt()
            if with_box:
                prompt.append_boxes(box.view(1, 1, 4), torch.tensor([[True]]))
            return meta.forward_grounding(
                backbone_out=dict(backbone_out),
                find_input=processor.find_stage,
                geometric_prompt=prompt,
                find_target=None,
            )

        def ours_run(boxes: list[float] | None, label: int = 1):
            extra = {}
            if boxes is not None:
                extra = {"input_boxes": torch.tensor([[boxes]]), "input_boxes_labels": torch.tensor([[label]])}
            return ours(vision_embeds=vision, text_embeds=text, attention_mask=tokens["attention_mask"], **extra)

        # Both implementations run the geometry encoder when a box is given: the like-for-like check.
        report("text + one box", outputs(ours_run(box.tolist()), meta_run(True)))
        # Text only: Meta still runs the geometry encoder (its CLS token joins the prompt); transformers'
        # Sam3Model skips it when no box is given, so the two implementations differ there.
        report("text only, transformers as is", outputs(ours_run(None), meta_run(False)))
        report(
            "text only, transformers given one padding box (label -10)",
            outputs(ours_run([0.0, 0.0, 0.0, 0.0], -10), meta_run(False)),
        )
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
