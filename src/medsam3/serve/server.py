"""Run the app under uvicorn: the library behind ``medsam3 serve``."""

from __future__ import annotations

import ipaddress
import logging

from medsam3.serve.settings import ServeSettings, token_from_env

log = logging.getLogger("medsam3.serve")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(
    settings: ServeSettings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    max_connections: int = 64,
    token_env: str | None = None,
) -> None:
    """Load the model once and serve the API and the viewer until interrupted (Ctrl-C).

    ``token_env`` names the environment variable holding the bearer token (the token itself never
    appears on a command line, where other users could read it).
    """
    import dataclasses

    import uvicorn

    from medsam3.serve.app import create_app

    settings = settings or ServeSettings()
    if token_env is not None:
        settings = dataclasses.replace(settings, token=token_from_env(token_env))
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s: %(message)s")
    if settings.token is None and not _loopback(host):
        log.warning("serving on %s without a token: anyone who can reach it can use it (see --token-env)", host)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    server = uvicorn.Server(config)
    log.info("medsam3 serve: http://%s:%d/ (API docs at /docs)", host, port)
    server.run()
