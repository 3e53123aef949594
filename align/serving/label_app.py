"""`align label`'s web server: the page, and a small JSON API behind it (Starlette on uvicorn).

    GET  /                   the page (static: the answers arrive as JSON and are put into the page as text)
    GET  /api/next?annotator=NAME   {"status": "item", "item": {"id", "prompt", "a", "b"}, progress...}
                                    or {"status": "waiting" | "done" | "failed", "message", progress...}
    POST /api/judge          {"item", "annotator", "label": a|b|tie|both_bad|skip, "comment"} -> {"status": "recorded"}
    GET  /api/progress?annotator=NAME,  GET /health

The same host and key rules as `align serve-rm`: loopback unless ALIGN_API_KEY is set (the page then needs
?key=KEY in its address, and sends it with every request). The page's Content-Security-Policy allows only its own
script, so even text that slipped into markup could not run.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from align.serving.label_session import LabelSession
from align.serving.label_store import ANNOTATOR, Rejected
from align.serving.serve import _authorized, _parse_json, _read_body, _Reject, check_bind

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
SECURITY = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                      "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript"),
              "/page.css": ("page.css", "text/css")}


def _page_file(name: str) -> bytes:
    return resources.files("align.serving").joinpath("label_page", name).read_bytes()


def create_app(session: LabelSession, api_key: str | None = None, agreement: Any = None):
    """`agreement`: judgement rows -> a summary of the annotators' agreement (shown in /api/progress)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    pages = {path: (_page_file(name), kind) for path, (name, kind) in PAGE_FILES.items()}

    def reply(body: dict[str, Any], status: int = 200) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers=SECURITY)

    def guarded(handler):
        async def run(request):
            if not _authorized(request.headers, api_key):
                return JSONResponse({"error": "missing or wrong API key: open the page as /?key=KEY"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer", **SECURITY})
            try:
                return reply(await handler(request))
            except (_Reject, Rejected) as e:
                return reply({"error": e.message}, e.status)
        return run

    def annotator_of(request) -> str:
        name = request.query_params.get("annotator", "")
        if not ANNOTATOR.match(name):
            raise Rejected(422, "?annotator= must be a name of 1-64 letters, digits, '_', '.', '@' or '-'")
        return name

    async def page(request):
        body, kind = pages[request.url.path]
        return Response(body, media_type=kind, headers=SECURITY)

    async def next_item(request):
        return session.next_item(annotator_of(request))

    async def progress(request):
        out = session.progress(annotator_of(request))
        if agreement is not None:
            out["agreement"] = agreement(list(session.judgements))
        return out

    async def judge(request):
        if "application/json" not in request.headers.get("content-type", ""):
            raise Rejected(415, "send the judgement as JSON (Content-Type: application/json)")
        return session.submit(_parse_json(await _read_body(request, MAX_BODY)))

    async def health(request):
        p = session.progress("")
        return {"status": "ok" if p["error"] is None else "failed", "mode": p["mode"], "made": p["made"],
                "total": p["total"], "judgements": len(session.judgements), "error": p["error"]}

    async def failed(request, exc):
        log.exception("label page request failed")
        return reply({"error": f"internal error: {type(exc).__name__}"}, 500)

    routes = [Route(path, page, methods=["GET"]) for path in pages]
    routes += [Route("/api/next", guarded(next_item), methods=["GET"]),
               Route("/api/progress", guarded(progress), methods=["GET"]),
               Route("/api/judge", guarded(judge), methods=["POST"]),
               Route("/health", guarded(health), methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={Exception: failed})


def make_server(session: LabelSession, host: str = "127.0.0.1", port: int = 8100, api_key: str | None = None,
                agreement: Any = None, log_level: str = "warning"):
    """A uvicorn server for the page (call .run(), or run it in a thread and set .should_exit to stop it)."""
    import uvicorn

    check_bind(host, api_key)
    config = uvicorn.Config(create_app(session, api_key, agreement), host=host, port=port, log_level=log_level,
                            limit_concurrency=64, timeout_keep_alive=5, server_header=False)
    return uvicorn.Server(config)
