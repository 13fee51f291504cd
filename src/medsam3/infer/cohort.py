"""Segment a cohort: a folder (or list file, or nnU-Net/MSD dataset) in, a folder out.

The library behind ``medsam3 segment-volume IN_FOLDER --out OUT_FOLDER`` and ``medsam3 segment
IN_FOLDER --out OUT_FOLDER``. What it promises:

- One model load per worker for the whole cohort (the OpenVINO compile and text cache are kept).
- One output per case in ``OUT``, keeping the input's geometry: ``CASE.nii.gz`` / ``.nrrd`` /
  ``.mha`` like the input (a DICOM series folder gives ``CASE.nii.gz`` and a DICOM-SEG
  ``CASE_seg.dcm``), its legend ``CASE.json``; a 2D image gives the folder ``CASE/`` that
  ``medsam3 segment`` writes. Every file is written atomically by the single-file writers
  (:func:`~medsam3.infer.volume.segment_volume_file`, :func:`~medsam3.infer.segment.segment_path`),
  and no output may be an input.
- ``summary.csv`` (case, concept, voxels, volume_ml, instances, presence, seconds, status, reason)
  and ``summary.json``, rewritten after every case so an interrupted run still has one.
- Resumable: each finished case leaves a record in ``OUT/.medsam3-cohort/`` with its input's
  SHA-256 and the settings' digest; a rerun reuses a case only when both match and its outputs
  are still there (changed settings or a changed input redo it; failed cases are retried).
- Fault tolerant: a case that fails (corrupt file, full disk, ...) is recorded with its one-line
  reason and the run goes on; :attr:`CohortRun.failed` says whether any did (the CLI exits 3).
- One run per output folder: a second one is refused while the first holds the folder's lock
  (an ``flock``, released by the kernel if the holder dies, so a crash never leaves it stale).
- ``workers`` processes, each with its own model and ``cores // workers`` torch threads; a worker
  that dies (killed, out of memory) has its unfinished cases redone by a fresh pool, twice at most.
  ``ray_address`` hands the same cases to :mod:`medsam3.infer.cohort_ray` instead.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medsam3.errors import InputFileError, MedSAM3Error, OutputError
from medsam3.model.presets import DEFAULT_MODEL
from medsam3.utils.terminal import one_line

KINDS = ("volume", "image")
STATE_FOLDER = ".medsam3-cohort"
LOCK_FILE = ".medsam3-cohort.lock"
SUMMARY_FILES = ("summary.csv", "summary.json")
SUMMARY_COLUMNS = ("case", "concept", "voxels", "volume_ml", "instances", "presence", "seconds", "status", "reason")
#: Exit code of the CLI when the run finished but at least one case failed (user errors stay 2).
FAILED_CASES_EXIT = 3
_LIST_SUFFIXES = (".txt", ".lst", ".list")
_POOL_RESTARTS = 2  # fresh pools after a worker died, before the cases left are recorded as failed


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class CohortCase:
    """One input of a cohort: its name (the output stem), path, and whether it is a DICOM series."""

    name: str
    path: str
    dicom: bool = False

    def output_files(self, kind: str) -> list[str]:
        """The names this case writes in the output folder (a 2D case writes one folder)."""
        if kind == "image":
            return [self.name]
        mask = self.name + _mask_suffix(self.path, self.dicom)
        files = [mask, self.name + ".json"]
        return files + [self.name + "_seg.dcm"] if self.dicom else files


def _mask_suffix(path: str, dicom: bool) -> str:
    """The label map's ending: the input's own, where it is one we write."""
    from medsam3.data.volume_io import MASK_SUFFIXES
    from medsam3.utils.files import file_suffix

    if dicom:
        return ".nii.gz"
    suffix = file_suffix(path)
    if suffix in MASK_SUFFIXES:
        return suffix
    return {".nhdr": ".nrrd", ".mhd": ".mha"}.get(suffix, ".nii.gz")


def _is_dicom_series(folder: Path) -> bool:
    from medsam3.data.volume_io import list_dicom_series

    try:
        return bool(list_dicom_series(folder))
    except (OSError, RuntimeError, MedSAM3Error):
        return False


def _case_suffixes(kind: str) -> tuple[str, ...]:
    from medsam3.data.image_io import DICOM_SUFFIXES, RASTER_SUFFIXES, TIFF_SUFFIXES
    from medsam3.data.volume_io import VOLUME_SUFFIXES

    return tuple(VOLUME_SUFFIXES) if kind == "volume" else RASTER_SUFFIXES + TIFF_SUFFIXES + DICOM_SUFFIXES


def _channel_zero(paths: list[Path]) -> list[tuple[str, Path]]:
    """nnU-Net names images CASE_0000 (channel 0), CASE_0001, ...: keep channel 0, named CASE.

    Applied only when every file carries a channel suffix, so plain names ending in digits stay whole.
    """
    from medsam3.data.layouts.nnunet import _CHANNEL
    from medsam3.utils.files import strip_suffix

    stems = [strip_suffix(p) for p in paths]
    matches = [_CHANNEL.match(s) for s in stems]
    if paths and all(matches):
        return [(m["case"], p) for m, p in zip(matches, paths, strict=True) if int(m["channel"]) == 0]
    return list(zip(stems, paths, strict=True))


def _folder_cases(folder: Path, kind: str, skip: Path | None) -> list[tuple[str, Path, bool]]:
    """Files directly in ``folder`` (and, for volumes, DICOM series sub-folders)."""
    from medsam3.data.layouts.base import child_dir
    from medsam3.data.layouts.nnunet import NnUNetLayout, read_dataset_json
    from medsam3.data.layouts.readers import files_with
    from medsam3.utils.outputs import same_path

    root = NnUNetLayout().find_root(folder) if (folder / "dataset.json").is_file() else None
    if root is not None:  # nnU-Net v2 / MSD: every image of imagesTr and imagesTs, channel 0
        ending = read_dataset_json(root / "dataset.json").get("file_ending")
        suffixes = (ending.lower(),) if isinstance(ending, str) and ending else _case_suffixes(kind)
        found = []
        for sub in ("imagesTr", "imagesTs"):
            images = child_dir(root, sub)
            if images is not None:
                found += [(n, p, False) for n, p in _channel_zero(files_with(images, suffixes))]
        return found
    found = [(n, p, False) for n, p in _channel_zero(files_with(folder, _case_suffixes(kind)))]
    if kind == "volume":
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (skip is None or not same_path(sub, skip)) and _is_dicom_series(sub):
                found.append((sub.name, sub, True))
    return found


def _list_file_cases(list_file: Path) -> list[tuple[str, Path, bool]]:
    """One path per line (relative to the list file's folder); blank lines and '#' comments skipped."""
    from medsam3.utils.files import strip_suffix

    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputFileError(list_file, f"cannot be read as a list of paths ({one_line(error)})") from None
    found = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path = Path(text).expanduser()
        path = path if path.is_absolute() else list_file.parent / path
        if not path.exists():
            raise InputFileError(list_file, f"line {number}: {path}: no such file or folder")
        found.append((strip_suffix(path), path, path.is_dir()))
    return found


def is_cohort_source(path: str | Path, kind: str) -> bool:
    """True when ``path`` names a cohort (a folder or list file) rather than one input.

    A folder holding a DICOM series is one volume, not a cohort; a ``.txt``/``.lst`` file is a list.
    """
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in _LIST_SUFFIXES
    if not path.is_dir():
        return False
    return kind == "image" or not _is_dicom_series(path)


def find_cases(source: str | Path, kind: str, *, out: str | Path | None = None) -> list[CohortCase]:
    """The cases of ``source`` (folder, list file, or nnU-Net/MSD dataset) with unique names; a
    folder's sorted by name, a list file's in its order.

    Names are the file stems (nnU-Net's ``_0000`` channel suffix dropped); two inputs with one stem
    get ``_2``, ``_3``; no name may be ``summary`` (the summary files). ``out`` is never a case.
    """
    from medsam3.utils.outputs import unique_stems

    if kind not in KINDS:
        raise MedSAM3Error(f"unknown cohort kind '{kind}': use {' or '.join(KINDS)}")
    source = Path(source)
    if not source.exists():
        raise InputFileError(source, "no such file or folder")
    if source.is_file():
        found = _list_file_cases(source)  # in the list's own order
    else:
        found = sorted(_folder_cases(source, kind, Path(out) if out else None), key=lambda f: (f[0].lower(), str(f[1])))
    if not found:
        what = "volumes (NIfTI, NRRD, MHA, DICOM series folders)" if kind == "volume" else "2D images"
        raise InputFileError(source, f"holds no {what} to segment")
    names = unique_stems([n for n, _, _ in found], reserved=SUMMARY_FILES)
    return [CohortCase(name, str(path), dicom) for name, (_, path, dicom) in zip(names, found, strict=True)]


def input_digest(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, sorted): what a resume checks."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CohortSettings:
    """Everything that decides a case's output: two runs with equal settings give equal files."""

    kind: str
    prompts: tuple[str, ...]
    model: str = DEFAULT_MODEL
    adapter: str | None = None
    device: str = "auto"
    normalize: bool = True
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    window: str | None = None
    # volumes
    axis: int = 0
    method: str = "auto"  # as segment-volume: box propagation with a box, else slice by slice
    # 2D images
    nms_iou: float | None = None
    mask_source: str = "auto"
    # process defaults set by --dtype / --runtime (a spawned worker or Ray actor must set them too)
    towers: str = "auto"
    runtime: str = "auto"

    def digest(self) -> str:
        """What a resume compares: every field, plus the adapter file's content when there is one."""
        data = asdict(self)
        data.pop("device")  # where it runs does not change what it finds
        if self.adapter:
            adapter = Path(self.adapter)
            data["adapter_digest"] = input_digest(adapter) if adapter.exists() else None
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def process_settings(**options) -> CohortSettings:
    """:class:`CohortSettings` with this process's ``--dtype``/``--runtime`` defaults filled in."""
    from medsam3.model.precision import default_towers
    from medsam3.model.runtime import default_runtime

    options.setdefault("towers", default_towers())
    options.setdefault("runtime", default_runtime())
    options["prompts"] = tuple(options["prompts"])
    options["adapter"] = None if options.get("adapter") is None else str(options["adapter"])
    return CohortSettings(**options)


# ----------------------------------------------------------------------------- one case


@dataclass
class CaseResult:
    """What one case gave: a summary row per concept (or one failure row), and how long it took."""

    case: str
    status: str  # ok | reused | failed
    seconds: float
    rows: list[dict] = field(default_factory=list)
    reason: str = ""
    input: str = ""
    input_digest: str = ""
    outputs: list[str] = field(default_factory=list)

    def summary_rows(self) -> list[dict]:
        if self.status == "failed" or not self.rows:
            return [_row(self.case, "", None, None, None, None, self.seconds, self.status, self.reason)]
        done = {"case": self.case, "seconds": round(self.seconds, 3), "status": self.status}
        return [{**row, **done} for row in self.rows]


def _row(case, concept, voxels, volume_ml, instances, presence, seconds, status, reason="") -> dict:
    return {
        "case": case,
        "concept": concept,
        "voxels": voxels,
        "volume_ml": volume_ml,
        "instances": instances,
        "presence": presence,
        "seconds": round(float(seconds), 3),
        "status": status,
        "reason": reason,
    }


def failure_reason(error: BaseException) -> str:
    """One line for the summary: a user error's own message, an OS error's path and cause, else the bug."""
    if isinstance(error, MedSAM3Error):
        return one_line(error)
    if isinstance(error, OSError):
        from medsam3.utils.files import describe_os_error

        return one_line(describe_os_error(error))
    if isinstance(error, MemoryError):
        return "out of memory"
    return one_line(f"internal error: {type(error).__name__}: {error}")


class CaseSegmenter:
    """A loaded model and its prompts, answering case after case (one per worker process or actor)."""

    def __init__(self, settings: CohortSettings, out: str | Path) -> None:
        from medsam3.infer.segment import build_predictor, build_prompts

        self.settings = settings
        self.out = Path(out)
        prompts, self.notes = build_prompts(list(settings.prompts))
        # towers and runtime go to this load only: an in-process cohort leaves the process defaults alone
        self.setup = build_predictor(
            settings.model,
            prompts,
            adapter=settings.adapter,
            device=settings.device,
            normalize=settings.normalize,
            score_threshold=settings.score_threshold,
            mask_threshold=settings.mask_threshold,
            nms_iou=settings.nms_iou,
            mask_source=settings.mask_source,
            towers=settings.towers,
            runtime=settings.runtime,
        )
        # the summary's concept: as typed, and what the model answered when the normaliser replaced it
        self.concepts = [typed if typed == used.text else f"{typed} (as {used.text})"
                         for typed, used in zip(settings.prompts, self.setup.prompts, strict=True)]  # fmt: skip

    def run(self, case: CohortCase) -> CaseResult:
        """Segment and write one case; any failure becomes a ``failed`` result with its reason."""
        start = time.perf_counter()
        try:
            rows = self._volume(case) if self.settings.kind == "volume" else self._image(case)
        except (Exception, MemoryError) as error:  # noqa: BLE001 - one bad case must not stop the cohort
            return CaseResult(case.name, "failed", time.perf_counter() - start, reason=failure_reason(error),
                              input=case.path)  # fmt: skip
        # what was written: an empty result has no DICOM-SEG, and a resume must not wait for one
        written = [name for name in case.output_files(self.settings.kind) if (self.out / name).exists()]
        return CaseResult(case.name, "ok", time.perf_counter() - start, rows, input=case.path, outputs=written)

    def _volume(self, case: CohortCase) -> list[dict]:
        import numpy as np

        from medsam3.data.masks import label_components
        from medsam3.infer.volume import check_volume_outputs, segment_volume_file

        s = self.settings
        mask, _, *dicom = case.output_files("volume")
        out = check_volume_outputs(case.path, self.out / mask, self.out / dicom[0] if dicom else None)
        seg = segment_volume_file(
            case.path, self.setup.prompts, self.setup.predictor, out,
            dicom_seg=self.out / dicom[0] if dicom else None, notes=[*self.notes, *self.setup.notes],
            axis=s.axis, method=s.method, window=s.window,
        )  # fmt: skip
        legend = json.loads((self.out / (case.name + ".json")).read_text())
        rows = []
        for entry, concept in zip(legend["prompts"], self.concepts, strict=True):
            _, instances = label_components(seg.label_map == entry["label"])
            rows.append(_row(case.name, concept, entry["voxels"], entry["volume_ml"], instances,
                             round(float(np.float32(entry["max_score"])), 4), 0.0, "ok"))  # fmt: skip
        return rows

    def _image(self, case: CohortCase) -> list[dict]:
        from medsam3.infer.segment import segment_path

        s = self.settings
        result = segment_path(
            case.path, [p.text for p in self.setup.prompts], self.out / case.name,
            predictor=self.setup.predictor, normalize=False, window=s.window,
        )  # fmt: skip
        return [
            _row(case.name, concept, int(r.union.sum()), None, len(r), round(float(r.presence), 4), 0.0, "ok")
            for r, concept in zip(result.results, self.concepts, strict=True)
        ]


# ----------------------------------------------------------------------------- the run


@dataclass
class CohortRun:
    """The outcome of :func:`segment_cohort`."""

    out: Path
    results: list[CaseResult]
    workers: int
    threads: int
    backend: str

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.medsam3-cohort.lock`` for the run; a second run on ``out`` is refused at once."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputError(
                f"{out}: another medsam3 run ({holder}) is writing to this folder; wait for it to finish or "
                "choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def _record_path(out: Path, case: CohortCase) -> Path:
    return out / STATE_FOLDER / f"{case.name}.json"


def _reusable(out: Path, case: CohortCase, digest: str, settings_digest: str, kind: str) -> CaseResult | None:
    """The earlier result of ``case`` if it was done with this input and these settings and its outputs remain."""
    try:
        record = json.loads(_record_path(out, case).read_text())
    except (OSError, ValueError):
        return None
    if record.get("input_digest") != digest or record.get("settings_digest") != settings_digest:
        return None
    outputs = record.get("outputs") or case.output_files(kind)[:1]
    if not all((out / name).exists() for name in outputs):
        return None
    return CaseResult(case.name, "reused", float(record.get("seconds", 0.0)), record.get("rows", []),
                      input=case.path, input_digest=digest, outputs=record.get("outputs", []))  # fmt: skip


def _write_record(out: Path, case: CohortCase, result: CaseResult, settings_digest: str) -> None:
    from medsam3.utils.files import write_json_atomic

    write_json_atomic(
        _record_path(out, case),
        {
            "case": case.name,
            "input": case.path,
            "input_digest": result.input_digest,
            "settings_digest": settings_digest,
            "seconds": result.seconds,
            "outputs": result.outputs,
            "rows": result.rows,
        },
        allow_nan=False,
    )


def write_summary(out: Path, results: Sequence[CaseResult], settings: CohortSettings, extra: dict) -> None:
    """``summary.csv`` (a row per case and concept) and ``summary.json``, both written atomically."""
    from medsam3.utils.files import atomic_files, write_json_atomic

    rows = [row for r in results for row in r.summary_rows()]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in SUMMARY_COLUMNS})
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "reused", "failed")}
    with atomic_files() as files:
        files.path(out / "summary.csv").write_text(text.getvalue(), encoding="utf-8")
        write_json_atomic(
            files.path(out / "summary.json"),
            {
                "settings": asdict(settings),
                **extra,
                "cases": len(results),
                **counts,
                "failed_cases": {r.case: r.reason for r in results if r.status == "failed"},
                "rows": rows,
            },
            allow_nan=False,
        )


def split_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker so that workers x threads <= cores (at least 1)."""
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


# a spawned worker's own segmenter (one model per process), or why it could not be made
_WORKER: CaseSegmenter | None = None
_WORKER_ERROR = ""
_SETUP_FAILED = "setup-failed"  # a worker could not load the model: a user error for the whole run


def _init_worker(settings: CohortSettings, out: str, threads: int) -> None:
    import torch

    global _WORKER, _WORKER_ERROR
    torch.set_num_threads(threads)
    try:
        _WORKER = CaseSegmenter(settings, out)
    except MedSAM3Error as error:  # an unknown model, a bad adapter: said once by the driver, not per case
        _WORKER_ERROR = one_line(error)


def _work(case: CohortCase) -> CaseResult:
    if _WORKER is None:
        return CaseResult(case.name, _SETUP_FAILED, 0.0, reason=_WORKER_ERROR, input=case.path)
    return _WORKER.run(case)


def _run_inline(cases, settings, out) -> Iterator[CaseResult]:
    segmenter = CaseSegmenter(settings, out)
    for case in cases:
        yield segmenter.run(case)


def _run_pool(cases: list[CohortCase], settings, out, workers: int, threads: int) -> Iterator[CaseResult]:
    """Cases on ``workers`` spawned processes; a pool broken by a dead worker is replaced for the rest."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    todo = list(cases)
    for attempt in range(_POOL_RESTARTS + 1):
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(todo)), mp_context=context, initializer=_init_worker,
            initargs=(settings, str(out), threads),
        )  # fmt: skip
        pending = {pool.submit(_work, case): case for case in todo}
        broken = False
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    case = pending.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        pending[future] = case
                        continue
                    if result.status == _SETUP_FAILED:
                        raise MedSAM3Error(result.reason)
                    yield result
                if broken:
                    break
        finally:
            pool.shutdown(wait=not broken, cancel_futures=True)
        if not broken:
            return
        todo = [case for case in todo if case in pending.values()]
        if attempt == _POOL_RESTARTS:
            for case in todo:
                yield CaseResult(case.name, "failed", 0.0, input=case.path,
                                 reason="its worker process died (killed, or out of memory) three times")  # fmt: skip


def segment_cohort(
    source: str | Path,
    out: str | Path,
    settings: CohortSettings,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    progress: bool = False,
    on_result: Callable[[CaseResult], None] | None = None,
) -> CohortRun:
    """Segment every case of ``source`` into ``out`` (see the module doc); returns what each case gave.

    Refuses (one line, nothing written) an output folder that is, or holds, the input, a source
    with no cases, and an output folder another run holds. ``workers`` > 1 runs spawned processes;
    ``ray_address`` runs Ray Data actors on that cluster (``workers`` actors). ``progress`` shows a
    bar with an ETA on stderr; ``on_result`` is called after each case (reused ones included).
    """
    from medsam3.utils.outputs import check_output_folder, is_inside, same_path

    source, out = Path(source), Path(out)
    if workers < 1:
        raise MedSAM3Error(f"--workers must be at least 1, got {workers}")
    from medsam3.utils.files import file_suffix

    cases = find_cases(source, settings.kind, out=out)  # a source with no cases is named first
    if file_suffix(out) in (*_case_suffixes("volume"), *_case_suffixes("image")):
        raise OutputError(f"{out}: a cohort writes one output per case, so --out must be a folder, not a file name")
    if same_path(source, out):
        raise OutputError(f"{out}: --out is the input folder; choose another folder, the inputs stay untouched")
    for case in cases:
        if same_path(case.path, out) or is_inside(out, case.path):
            raise OutputError(f"{out}: --out lies inside the input {case.path}; choose a folder outside it")
    files = [f for c in cases for f in c.output_files(settings.kind)] if settings.kind == "volume" else []
    check_output_folder(out, inputs=[c.path for c in cases], files=[*files, *SUMMARY_FILES])
    threads = split_threads(workers)
    with output_lock(out):
        settings_digest = settings.digest()
        results: dict[str, CaseResult] = {}
        todo: list[CohortCase] = []
        digests: dict[str, str] = {}
        for case in cases:
            try:
                digests[case.name] = input_digest(case.path)
            except OSError as error:
                results[case.name] = CaseResult(case.name, "failed", 0.0, input=case.path, reason=failure_reason(error))
                continue
            earlier = _reusable(out, case, digests[case.name], settings_digest, settings.kind)
            if earlier is not None:
                results[case.name] = earlier
            else:
                todo.append(case)
        backend = "ray" if ray_address else ("processes" if workers > 1 and len(todo) > 1 else "inline")
        extra = {"source": str(source), "backend": backend, "workers": workers, "threads_per_worker": threads}
        ordered = lambda: [results[c.name] for c in cases if c.name in results]  # noqa: E731
        for result in results.values():
            if on_result is not None:
                on_result(result)
        by_name = {c.name: c for c in cases}
        if todo:
            if ray_address:
                from medsam3.infer.cohort_ray import run_on_ray

                stream = run_on_ray(todo, settings, out, ray_address, workers)
            elif backend == "processes":
                stream = _run_pool(todo, settings, out, workers, threads)
            else:
                stream = _run_inline(todo, settings, out)
            bar = _progress_bar(len(cases), len(results), progress)
            try:
                for result in stream:
                    case = by_name[result.case]
                    result.input, result.input_digest = case.path, digests[case.name]
                    if result.status == "ok":
                        _write_record(out, case, result, settings_digest)
                    results[case.name] = result
                    write_summary(out, ordered(), settings, extra)
                    bar.update(1)
                    if on_result is not None:
                        on_result(result)
            finally:
                bar.close()
        write_summary(out, ordered(), settings, extra)
    return CohortRun(out, ordered(), workers, threads, backend)


def _progress_bar(total: int, done: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="case", desc="cohort", disable=not show, dynamic_ncols=True)
