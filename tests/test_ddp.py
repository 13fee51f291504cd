"""Multi-process training: the same command under torchrun keeps every rank's weights identical."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path):
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(worker), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(tmp_path / "rank0_of_2.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1_of_2.pt", weights_only=True)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # only rank 0 writes checkpoints and metrics
    assert (tmp_path / "last" / "adapter.safetensors").is_file()
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 2
    # and training changed the detector (the ranks did not just agree on doing nothing)
    from medsam3.model import load_model

    fresh = dict(load_model("tiny", device="cpu").model.named_parameters())
    assert any(not torch.equal(a[n], fresh[n]) for n in a)
