"""Run by test_ddp.py under torchrun: two CPU processes (gloo) train the tiny model together."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from medsam3.model import load_model  # noqa: E402
from medsam3.train.trainer import TrainConfig, Trainer  # noqa: E402
from train_helpers import disk_samples  # noqa: E402

torch.set_num_threads(1)
out = Path(sys.argv[1])
torch.manual_seed(0)
loaded = load_model("tiny", device="cpu")
config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, grad_clip=1.0, progress=False, prompt_mode="mixed")
trainer = Trainer(loaded, disk_samples(8), out, config)
trainer.fit()
weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
torch.save(weights, out / f"rank{trainer.rank}_of_{trainer.world}.pt")
