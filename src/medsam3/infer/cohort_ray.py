"""A cohort on a Ray cluster: Ray Data hands the cases to actors that each hold one loaded model.

Used by :func:`medsam3.infer.cohort.segment_cohort` when given ``ray_address``; the driver keeps
the lock, the resume records and the summary, so the outputs, summary and resume are the same as
with local workers. Each actor reads its case, segments it with
:class:`~medsam3.infer.cohort.CaseSegmenter` and writes the outputs itself (atomically), so the
output folder must be on a file system every node sees (as the inputs must be).

An actor that dies (a killed process, a lost node) is restarted by Ray Data with a fresh model and
its case is retried (Ray Data's actor pools restart and retry without limit); a count kept next to
the resume records stops a case that kills every actor it meets after ``TASK_RETRIES`` retries,
recording it as failed. Should Ray give up, the cases that never came back are recorded as failed
with the reason. Needs the optional extra: ``pip install 'medsam3[ray]'``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from medsam3.errors import MedSAM3Error
from medsam3.infer.cohort import STATE_FOLDER, CaseResult, CaseSegmenter, CohortCase, CohortSettings, failure_reason

#: Times a case is retried on a fresh actor after its actor died (then it is recorded as failed).
TASK_RETRIES = 2


class _CohortActor:
    """Holds one model for its lifetime; ``__call__`` segments a batch of cases (batch size 1)."""

    def __init__(self, settings: dict, out: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        settings["prompts"] = tuple(settings["prompts"])
        self.segmenter = CaseSegmenter(CohortSettings(**settings), out)

    def __call__(self, batch: dict) -> dict:
        results = []
        for name, path, dicom in zip(batch["name"], batch["path"], batch["dicom"], strict=True):
            case = CohortCase(str(name), str(path), bool(dicom))
            marker = attempts_file(self.segmenter.out, case)
            tried = int(marker.read_text() or 0) if marker.is_file() else 0
            if tried > TASK_RETRIES:
                reason = f"its Ray worker died {tried} times on this case (killed, or out of memory)"
                result = CaseResult(case.name, "failed", 0.0, input=case.path, reason=reason)
            else:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(tried + 1))  # still there if this process dies
                result = self.segmenter.run(case)
                marker.unlink(missing_ok=True)
            results.append(json.dumps(asdict(result)))
        return {"result": results}


def attempts_file(out: Path, case: CohortCase) -> Path:
    """Counts the actors a case was started on: Ray retries a dead actor's case without limit."""
    return Path(out) / STATE_FOLDER / f"{case.name}.ray-attempts"


def connect(address: str, cpus: int | None = None):
    """Join the Ray cluster at ``address`` ('auto', 'ray://host:port', host:port), or start a
    local one for 'local'; a Ray already initialised in this process is used as it is."""
    try:
        import ray
    except ImportError:
        raise MedSAM3Error("--ray needs Ray Data: pip install 'medsam3[ray]'") from None
    if not ray.is_initialized():
        options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if address == "local":
                ray.init(num_cpus=cpus, **options)
            else:
                ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise MedSAM3Error(f"--ray {address}: cannot connect to a Ray cluster ({failure_reason(error)})") from None
    return ray


def run_on_ray(
    cases: list[CohortCase], settings: CohortSettings, out: Path, address: str, actors: int
) -> Iterator[CaseResult]:
    """Segment ``cases`` on ``actors`` Ray actors (one GPU each on CUDA, else the cluster's CPUs
    shared out); yields each case's result as it arrives."""
    ray = connect(address)
    import ray.data  # noqa: F811 - the submodule, on the package connect() imported

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the cohort's own bar counts cases
    context.print_on_execution_start = False
    gpu = settings.device.startswith("cuda")
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, actors))
    resources = {"num_gpus": 1} if gpu else {"num_cpus": cpus}
    items = [{"name": c.name, "path": c.path, "dicom": c.dicom} for c in cases]
    for case in cases:  # a new run starts every case's count afresh
        attempts_file(out, case).unlink(missing_ok=True)
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _CohortActor,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(items))),
        fn_constructor_kwargs={"settings": asdict(settings), "out": str(out), "threads": 1 if gpu else cpus},
        **resources,
    )
    returned: set[str] = set()
    try:
        for row in dataset.iter_rows():
            result = CaseResult(**json.loads(row["result"]))
            returned.add(result.case)
            yield result
    except Exception as error:  # noqa: BLE001 - Ray gave up: the cases left are failed, with why
        reason = f"Ray could not finish it: {failure_reason(error)}"
        for case in cases:
            if case.name not in returned:
                yield CaseResult(case.name, "failed", 0.0, reason=reason, input=case.path)
