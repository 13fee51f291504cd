"""`medsam3 evaluate --agent`: the agent scored like any model, offline and through a scripted MLLM."""

import json
import time

import numpy as np
from PIL import Image

from medsam3.cli import main
from scripted_llm_server import Hang, ScriptedLLMServer


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


def test_evaluate_agent_timeout_and_no_usable_action_exit_2(tmp_path, capsys):
    """``--timeout`` bounds each case's agent run; a case the LLM gave no usable action for fails the
    evaluation with one line (``--skip-bad`` skips and lists it instead)."""
    data = _paired_dataset(tmp_path / "data", n=1)

    def evaluate(server, *extra):
        capsys.readouterr()
        args = ["evaluate", str(data), "--model", "tiny", "--split", "train", "--agent", "openai"]
        args += ["--llm-base-url", server.url, "--llm-model", "scripted-mllm", *extra]
        code = main(args)
        stopped = time.monotonic()
        lines = capsys.readouterr().err.splitlines()
        return code, [line for line in lines if line.strip() and "case/s]" not in line], stopped  # no progress bar

    with ScriptedLLMServer([Hang(30)]) as server:
        code, err, stopped = evaluate(server, "--timeout", "1.5", "--out", str(tmp_path / "hang"))
    assert code == 2 and len(err) == 1 and "--timeout of 1.5 s ran out" in err[0], err
    assert stopped - server.received[0].at < 3.0 and len(server.received) == 1

    refusal = "I'm sorry, I can't help with that."
    with ScriptedLLMServer([refusal] * 3) as server:
        code, err, _ = evaluate(server, "--out", str(tmp_path / "refused"))
    assert code == 2 and len(err) == 1 and "the LLM gave no usable action" in err[0], err
    with ScriptedLLMServer([refusal] * 3) as server:
        code, err, _ = evaluate(server, "--skip-bad", "--out", str(tmp_path / "skipped"))
    assert code == 2 and "no case could be evaluated (1 skipped)" in err[-1] and "no usable action" in err[-1]
