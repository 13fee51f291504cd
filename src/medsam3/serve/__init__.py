"""``medsam3 serve``: a REST API and a web viewer over one shared model (FastAPI + uvicorn).

    from medsam3.serve import ServeSettings, create_app, run_server
    run_server(ServeSettings(model="nano"), port=8000)

Modules, one job each: ``settings`` (limits), ``guard`` (token and body size, before parsing),
``uploads`` (bytes to a validated image or volume), ``sessions`` (uploads kept, LRU), ``engine``
(the shared model, its lock and the feature cache), ``jobs`` (volume runs in the background),
``service`` (what each endpoint does), ``results`` (JSON, PNG, NIfTI, DICOM-SEG), ``app`` (HTTP
routes), ``server`` (uvicorn), ``live`` and ``loadtest`` (a real server process and clients for it,
used by the tests and ``benchmarks/bench_serve.py``); ``static/`` is the page.
"""

from medsam3.serve.settings import ServeSettings


def create_app(*args, **kwargs):
    from medsam3.serve.app import create_app as build

    return build(*args, **kwargs)


def run_server(*args, **kwargs):
    from medsam3.serve.server import run_server as run

    return run(*args, **kwargs)


__all__ = ["ServeSettings", "create_app", "run_server"]
