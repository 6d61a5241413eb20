"""The workbench and dashboard: static files from the package, at `/` and under `/static/`, with headers
that keep the page to its own origin (no inline scripts, no framing, nothing loaded from elsewhere)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

WEB_ROOT = resources.files("mistral_serve") / "web"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
               ".ico": "image/x-icon", ".json": "application/json"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@router.get("/")
async def index() -> Response:
    return _file("index.html")


@router.get("/static/{path:path}")
async def static(path: str) -> Response:
    return _file(path)


def _file(path: str) -> Response:
    parts = path.split("/")
    suffix = "." + parts[-1].rsplit(".", 1)[-1] if "." in parts[-1] else ""
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts) or suffix not in MEDIA_TYPES:
        return _not_found()
    resource = WEB_ROOT.joinpath(*parts)
    if not resource.is_file():
        return _not_found()
    return Response(resource.read_bytes(), media_type=MEDIA_TYPES[suffix], headers=SECURITY_HEADERS)


def _not_found() -> Response:
    return Response('{"error": {"message": "Not found.", "type": "not_found_error", "param": null, "code": null}}',
                    status_code=404, media_type="application/json", headers=SECURITY_HEADERS)
