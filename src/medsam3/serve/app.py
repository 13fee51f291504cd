"""The FastAPI application: routes, error responses, the web page and offline API docs."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsam3 import __version__
from medsam3.errors import MedSAM3Error
from medsam3.model.loading import LoadedModel
from medsam3.serve.guard import Guard
from medsam3.serve.http_errors import ApiError, one_line, status_for
from medsam3.serve.results import mask_png, overlay_png, pick_prompt, png_bytes
from medsam3.serve.schemas import SegmentRequest, VolumeJobRequest
from medsam3.serve.service import Service
from medsam3.serve.settings import MiB, ServeSettings

log = logging.getLogger("medsam3.serve")
STATIC = Path(__file__).parent / "static"
#: The only files the page is made of (URL name -> file, media type): no client path is looked up.
PAGE_FILES = {
    "app.js": ("app.js", "text/javascript"),
    "app.css": ("app.css", "text/css"),
}
_MULTIPART_SLACK = 1 * MiB  # form boundaries and headers around the file


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _png(data: bytes, filename: str | None = None) -> Response:
    headers = {"Cache-Control": "no-store"}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return Response(data, media_type="image/png", headers=headers)


def _file(data: bytes, filename: str, media_type: str) -> Response:
    return Response(
        data,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"},
    )


def create_app(settings: ServeSettings | None = None, *, loaded: LoadedModel | None = None) -> FastAPI:
    """The app for ``settings``; the model is loaded here, once (or ``loaded`` is used as given)."""
    settings = settings or ServeSettings()
    if loaded is None:
        from medsam3.model import load_model

        loaded = load_model(settings.model, device=settings.device, adapter=settings.adapter)
    service = Service(settings, loaded)
    if settings.warm_up:
        service.warm_up()
    pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="medsam3-serve")
    atexit.register(service.close)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        log.info(
            "medsam3 serve: model %s on %s, temporary files in %s", loaded.spec, loaded.device, service.sessions.root
        )
        try:
            yield
        finally:
            service.close()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="medsam3",
        version=__version__,
        description="Segment medical images by naming concepts (MedSAM-3). Upload an image or a volume, "
        "then segment it by concept phrases, optionally with boxes; download masks as PNG, NIfTI or DICOM-SEG.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(
        Guard,
        token=settings.token,
        max_body=settings.max_upload_bytes + _MULTIPART_SLACK,
        shown_limit=settings.max_upload_bytes,
    )
    bearer = HTTPBearer(auto_error=False, description="Needed when the server was started with --token-env.")
    api = [Depends(bearer)]  # documents the token in OpenAPI; the Guard middleware enforces it

    async def call(fn, *args, **kwargs):
        """Run ``fn`` on the bounded pool within the request time limit (fn gets the deadline if it asks)."""
        deadline = time.monotonic() + settings.request_timeout_s
        if "deadline" in kwargs:
            kwargs["deadline"] = deadline
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))
        try:
            return await asyncio.wait_for(future, timeout=settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                503,
                f"the request took longer than the server's limit of {settings.request_timeout_s:g} s",
                headers={"Retry-After": "5"},
            ) from None

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(MedSAM3Error)
    async def _medsam3_error(_request: Request, error: MedSAM3Error):
        status = status_for(error)
        if status >= 500:
            log.warning("%s", one_line(error))
        return _error(status, one_line(error), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path"))
            problems.append(f"{where or 'request'}: {item.get('msg', 'invalid')}")
        return JSONResponse(
            {"error": one_line("; ".join(problems) or "invalid request"), "problems": problems[:20]}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, error: StarletteHTTPException):
        return _error(error.status_code, one_line(error.detail), getattr(error, "headers", None))

    # -- the page and the docs ---------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def page_file(name: str):
        entry = PAGE_FILES.get(name)
        if entry is None:
            raise ApiError(404, "no such page file")
        return FileResponse(STATIC / entry[0], media_type=entry[1], headers={"Cache-Control": "no-cache"})

    _add_docs(app)

    # -- about -------------------------------------------------------------------------------
    @app.get("/api/health", tags=["server"], summary="Liveness, model and whether a token is needed (no token).")
    async def health():
        return service.health()

    @app.get("/api/info", tags=["server"], dependencies=api, summary="Model, concepts, window presets, limits, state.")
    async def info():
        return service.info()

    @app.get(
        "/api/concepts", tags=["server"], dependencies=api, summary="The model's concepts; suggestions for a phrase."
    )
    async def concepts(q: Annotated[str, Query(max_length=400)] = "", k: Annotated[int, Query(ge=1, le=10)] = 5):
        return await call(service.suggest, q, k)

    # -- sessions ----------------------------------------------------------------------------
    @app.post(
        "/api/sessions",
        status_code=201,
        tags=["sessions"],
        dependencies=api,
        summary="Upload an image (PNG/JPEG/TIFF/DICOM) or a volume (NIfTI/NRRD/MHA, zipped DICOM series).",
    )
    async def upload(
        file: Annotated[UploadFile, File(description="The image or volume file.")],
        series_uid: Annotated[str | None, Form(max_length=128, description="Zipped series: which series.")] = None,
    ):
        try:
            return await call(service.upload, file.file, file.filename, series_uid)
        finally:
            await file.close()

    @app.get("/api/sessions/{session_id}", tags=["sessions"], dependencies=api, summary="What an upload is.")
    async def session_info(session_id: str):
        return service.sessions.get(session_id).info()

    @app.delete(
        "/api/sessions/{session_id}",
        status_code=204,
        tags=["sessions"],
        dependencies=api,
        summary="Forget an upload and remove its files.",
    )
    async def session_delete(session_id: str):
        service.sessions.delete(session_id)
        return Response(status_code=204)

    @app.get(
        "/api/sessions/{session_id}/image.png",
        tags=["sessions"],
        dependencies=api,
        summary="The image as the model sees it (a volume: one slice, optionally windowed).",
    )
    async def session_image(
        session_id: str,
        slice: Annotated[int | None, Query(description="Volume slice (default: the middle one).")] = None,
        axis: Annotated[int, Query(ge=0, le=2)] = 0,
        window: Annotated[str | None, Query(max_length=40)] = None,
    ):
        session = service.sessions.get(session_id)

        def render() -> bytes:
            return png_bytes(service.picture(session, slice, axis, window)[0])

        return _png(await call(render))

    @app.post(
        "/api/sessions/{session_id}/segment",
        tags=["segment"],
        dependencies=api,
        summary="Segment the image (or one volume slice) by concepts, optionally with boxes.",
    )
    async def segment(session_id: str, body: SegmentRequest):
        return await call(service.segment, session_id, body, deadline=None)

    @app.get(
        "/api/sessions/{session_id}/results/{result_id}",
        tags=["segment"],
        dependencies=api,
        summary="A 2D result again.",
    )
    async def result_info(session_id: str, result_id: str):
        return service.sessions.get(session_id).result(result_id).body

    @app.get(
        "/api/sessions/{session_id}/results/{result_id}/masks/{k}.png",
        tags=["segment"],
        dependencies=api,
        summary="Prompt k's mask (0/255), or its instance map (1 = best instance).",
    )
    async def result_mask(session_id: str, result_id: str, k: int, instances: bool = False):
        result = service.sessions.get(session_id).result(result_id)
        prompt = pick_prompt(result.results, k)
        data = await call(mask_png, prompt, instances)
        name = result.body["prompts"][k - 1]["filename"] + ("_instances" if instances else "")
        return _png(data, f"{name}.png")

    @app.get(
        "/api/sessions/{session_id}/results/{result_id}/labels.png",
        tags=["segment"],
        dependencies=api,
        summary="All prompts as one label map (value k = prompt k).",
    )
    async def result_labels(session_id: str, result_id: str):
        from medsam3.serve.results import label_map_of

        result = service.sessions.get(session_id).result(result_id)
        return _png(await call(lambda: png_bytes(label_map_of(result.results))), "labels.png")

    @app.get(
        "/api/sessions/{session_id}/results/{result_id}/overlay.png",
        tags=["segment"],
        dependencies=api,
        summary="The masks drawn over the image, with boxes and a legend.",
    )
    async def result_overlay(session_id: str, result_id: str):
        result = service.sessions.get(session_id).result(result_id)
        return _png(await call(overlay_png, result.rgb, result.results), "overlay.png")

    @app.get(
        "/api/sessions/{session_id}/results/{result_id}/seg.dcm",
        tags=["segment"],
        dependencies=api,
        summary="DICOM-SEG of a 2D result (DICOM input only).",
    )
    async def result_seg(session_id: str, result_id: str):
        session = service.sessions.get(session_id)
        result = session.result(result_id)
        data = await call(service.dicom_seg_2d, session, result)
        return _file(data, f"medsam3_{result_id}_seg.dcm", "application/dicom")

    # -- volume jobs -------------------------------------------------------------------------
    @app.post(
        "/api/sessions/{session_id}/jobs",
        status_code=202,
        tags=["volumes"],
        dependencies=api,
        summary="Segment a whole volume in the background; poll the job for progress.",
    )
    async def job_submit(session_id: str, body: VolumeJobRequest):
        return await call(service.submit_job, session_id, body)

    @app.get("/api/jobs/{job_id}", tags=["volumes"], dependencies=api, summary="Status, progress and result of a job.")
    async def job_info(job_id: str):
        return service.jobs.get(job_id).info()

    @app.post(
        "/api/jobs/{job_id}/cancel", tags=["volumes"], dependencies=api, summary="Cancel a queued or running job."
    )
    async def job_cancel(job_id: str):
        return service.jobs.cancel(job_id).info()

    @app.get(
        "/api/jobs/{job_id}/mask",
        tags=["volumes"],
        dependencies=api,
        summary="The label map with the input's geometry (value k = concept k).",
    )
    async def job_mask(job_id: str, format: Annotated[str, Query(max_length=16)] = "nifti"):  # noqa: A002
        data, name = await call(service.jobs.mask_file, job_id, format)
        return _file(data, name, "application/octet-stream")

    @app.get("/api/jobs/{job_id}/seg.dcm", tags=["volumes"], dependencies=api, summary="DICOM-SEG (DICOM input).")
    async def job_seg(job_id: str):
        data, name = await call(service.jobs.dicom_seg, job_id)
        return _file(data, name, "application/dicom")

    @app.get(
        "/api/jobs/{job_id}/labels/{index}.png",
        tags=["volumes"],
        dependencies=api,
        summary="One slice (axis 0) of the label map, for viewers.",
    )
    async def job_labels(job_id: str, index: int):
        return _png(await call(service.jobs.label_slice, job_id, index))

    return app


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the locally installed swagger-ui-bundle (no CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # pragma: no cover - a declared dependency
        swagger_ui_path = None
    assets = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}

    @app.get("/docs", include_in_schema=False)
    async def docs():
        if swagger_ui_path is None:
            raise ApiError(404, "API docs need the package swagger-ui-bundle; the schema is at /openapi.json")
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="medsam3 API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str):
        if swagger_ui_path is None or name not in assets:
            raise ApiError(404, "no such file")
        return FileResponse(Path(str(swagger_ui_path)) / name, media_type=assets[name])
