"""The FastAPI app (OpenAI routes + web pages) and `ApiServer`, which runs it with uvicorn in a thread.

Running uvicorn off the main thread leaves signal handling to the caller (the CLI, the demo), which can then
stop the server, the engine and the client in order.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from corolla import __version__
from corolla.api.errors import install_error_handlers
from corolla.api.openai_routes import openai_router
from corolla.api.served import ServedModel
from corolla.api.web_routes import STATIC_DIR, web_router
from corolla.errors import CorollaError

logger = logging.getLogger(__name__)


def create_app(served: ServedModel, state_refresh_s: float = 2.0) -> FastAPI:
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and these machines may be offline.
    app = FastAPI(title="Corolla API", version=__version__, docs_url=None, redoc_url=None,
                  description=f"OpenAI-compatible API for {served.name}, served by a Corolla swarm")
    install_error_handlers(app)
    app.include_router(openai_router(served))
    app.include_router(web_router(served, state_refresh_s))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


class ApiServer:
    """uvicorn serving `app` on (host, port) from a background thread; port 0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, access_log: bool = False):
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as e:
            self._socket.close()
            raise CorollaError(f"cannot listen on {host}:{port} for the API: {e}") from e
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                                timeout_graceful_shutdown=3, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="corolla-api", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise CorollaError(f"the API server on {self.url} stopped while starting (see the log above)")
            if time.monotonic() > deadline:
                raise CorollaError(f"the API server on {self.url} did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 10) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the API server thread did not stop within %.0f s", timeout)
        self._socket.close()

    def __enter__(self) -> "ApiServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
