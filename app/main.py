"""The app factory: ``uvicorn app.main:create_app --factory``.

The web process imports only torch-free modules (``cbd.core.plan``, ``cbd.core.artifacts``, ``worker.queue``,
...); jobs are enqueued by dotted path and run in the workers. tests/test_api.py checks that a
POST leaves ``torch`` out of ``sys.modules``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import access_log, errors
from app.answer_cache import AnswerCache
from app.core.config import Settings
from app.metrics import Metrics
from app.quotas import Quotas
from app.routes import chains, checkpoints, health, hub, initialize, jobs, plan, ui
from cbd import __version__
from cbd.core import objstore
from worker import queue

# Request bodies over 64 KiB get 413 before they are parsed (the largest valid POST /initialize
# body is under 1 KiB); Starlette counts the bytes received, so chunked uploads are capped too.
MAX_BODY = 64 * 1024
DESCRIPTION = """Initialisations for small language models of any shape, interpolated from a chain
of distilled anchors (chain-based distillation). POST a target architecture to /initialize; the
answer lists downloadable files (200) or a job to poll (202 + Location). POST /plan tells what a body
would make and cost without enqueueing anything. A web page for people is at [/](/).

These docs: [Swagger UI](/docs), [ReDoc](/redoc), [openapi.json](/openapi.json)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.redis.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    objstore.get_store()  # a malformed CBD_STORE_URL stops the start, saying what is allowed
    # /docs and /redoc are app.routes.ui's: their scripts are served from here, not from a CDN
    app = FastAPI(title="cbd", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  max_body_size=MAX_BODY, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.redis = queue.connect(settings.redis_url)
    errors.install(app)
    hub.install(app)
    for module in (initialize, plan, jobs, checkpoints, chains, health, hub):  # hub last: its paths are the widest
        app.include_router(module.router)
    ui.install(app)
    app.add_middleware(AnswerCache, size=settings.answer_cache, max_body=MAX_BODY)  # innermost: the log and metrics see its hits
    if access_log.configure(settings.access_log):
        app.add_middleware(access_log.AccessLog)
    app.state.metrics = Metrics(app)
    app.state.quotas = Quotas(settings, app.state.redis)
    app.state.metrics.limits(app.state.quotas.describe())
    _document_limits(app)
    return app


def _document_limits(app: FastAPI) -> None:
    """The quotas in force, in the OpenAPI document: ``x-cbd-limits`` and the 429/503 descriptions."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            limits = app.state.quotas.describe()
            schema["info"]["x-cbd-limits"] = limits
            text = ", ".join(f"{k}={v if v else 'none'}" for k, v in limits.items())
            for code in ("429", "503"):
                resp = schema["paths"]["/initialize"]["post"]["responses"].get(code)
                if resp is not None:
                    resp["description"] += f". This service: {text}"
        return app.openapi_schema or schema

    app.openapi = openapi
