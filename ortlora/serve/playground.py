"""The playground: a static page on `GET /` and `/playground` that runs one prompt on the base model and any of the
adapters an API key may use, side by side, through the public API (so the requests share decode batches).

The page and its two assets load without a key; every API call the page makes carries the key typed into it,
which the browser keeps in sessionStorage only. Plain files in `static/`, no build step, nothing from a CDN.

    install(app)   # after create_app's API routes
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from ortlora.serve.errors import APIError

STATIC = Path(__file__).parent / "static"
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
# The page holds an API key: it may run only its own script and talk only to this server.
_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                       "form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def install(app: FastAPI) -> None:
    """Serve the page at `/` and `/playground`, and its script and style sheet under `/playground/`."""

    # Relative links in the page resolve the same from `/` and `/playground` (and under a proxy's prefix).
    @app.get("/", include_in_schema=False)
    @app.get("/playground", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)

    @app.get("/playground/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
            raise APIError(404, f"no playground file {name!r}")
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers=_HEADERS)
