"""The web pages (chat, swarm map) and their JSON: `/api/v1/state` (the swarm map) and `/api/v1/info`.

Plain HTML/JS/CSS files from corolla/api/static, served by the same app; nothing is fetched from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from corolla import __version__
from corolla.api.schemas import ErrorResponse
from corolla.api.served import ServedModel
from corolla.api.state import SwarmState

STATIC_DIR = Path(__file__).parent / "static"


class ApiInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str = Field(description="the served model's name")
    model_id: str
    num_blocks: int
    context_length: int = Field(description="most prompt + completion tokens")
    default_max_tokens: int
    state_refresh_s: float = Field(description="how often the swarm page re-reads /api/v1/state")
    version: str = Field(description="corolla version of this API server")


def web_router(served: ServedModel, state_refresh_s: float) -> APIRouter:
    router = APIRouter(tags=["web"])

    @router.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "chat.html")

    @router.get("/swarm", include_in_schema=False)
    async def swarm_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "swarm.html")

    @router.get("/api/v1/state", response_model=SwarmState, responses={504: {"model": ErrorResponse}})
    async def state() -> SwarmState:
        return await served.monitor.state()

    @router.get("/api/v1/info", response_model=ApiInfo)
    async def info() -> ApiInfo:
        return ApiInfo(model=served.name, model_id=served.model.swarm.model_id,
                       num_blocks=served.model.swarm.num_blocks, context_length=served.limits.context_length,
                       default_max_tokens=served.limits.default_max_tokens, state_refresh_s=state_refresh_s,
                       version=__version__)

    return router
