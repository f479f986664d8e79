"""The ingress deployment: app.py's FastAPI app (every endpoint, tenants, errors, streaming) over a `RayEngine`."""

from __future__ import annotations

import asyncio

from ray import serve

from ortlora.serve.config import ServeConfig
from ortlora.serve.ray.client import RayEngine

START_TIMEOUT_S = 600.0


@serve.ingress()
class Ingress:
    async def __init__(self, replicas, config: ServeConfig):
        limits = await asyncio.wait_for(replicas.describe.remote(), START_TIMEOUT_S)  # a first replica is up
        self.engine = RayEngine(replicas, limits, config)
        self.config = config

    def __serve_build_asgi_app__(self):
        from ortlora.serve.app import create_app

        return create_app(self.engine, self.config)
