"""`medsam3 evaluate --agent`: the agent scored like any model, offline and through a scripted MLLM."""

import json

import numpy as np
from PIL import Image

from medsam3.cli import main
from scripted_llm_server import ScriptedLLMServer


def _paired_dataset(root, n=3):
    """A paired-folder dataset: bright disks named 'polyp'."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:64, :64]
    for i in range(n):
        image = np.full((64, 64, 3), 30, np.uint8)
        mask = (yy - 20 - 8 * i) ** 2 + (xx - 30) ** 2 < 100
        image[mask] = 220
        Image.fromarray(image).save(root / "images" / f"case{i}.png")
        Image.fromarray((mask * 1).astype(np.uint8)).save(root / "masks" / f"case{i}.png")
    (root / "concepts.json").write_text(json.dumps({"1": "polyp"}))
    return root


def test_evaluate_agent_offline_and_scripted(tmp_path, capsys):
    data = _paired_dataset(tmp_path / "data")
    code = main(["evaluate", str(data), "--model", "tiny", "--split", "train", "--agent", "none",
                 "--out", str(tmp_path / "offline")])
    assert code == 0, capsys.readouterr().err
    offline = json.loads((tmp_path / "offline" / "summary.json").read_text())
    assert "AgentSegmenter" in json.dumps(offline)

    n_cases = offline["n_cases"]
    script = []
    for _ in range(n_cases):  # per case: segment, then accept
        script += [{"action": "segment", "concepts": ["polyp"], "box": None}, {"action": "accept"}]
    with ScriptedLLMServer(script) as server:
        code = main(["evaluate", str(data), "--model", "tiny", "--split", "train", "--agent", "openai",
                     "--llm-base-url", server.url, "--llm-model", "scripted-mllm", "--out", str(tmp_path / "llm")])
        assert code == 0, capsys.readouterr().err
        assert len(server.received) == 2 * n_cases  # every case went through the MLLM loop
    scripted = json.loads((tmp_path / "llm" / "summary.json").read_text())
    assert scripted["n_cases"] == n_cases
