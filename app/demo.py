"""``GET /demo``: a page that shows one sample user reranked, served from this package.

The page (app/static/demo.html, .js, .css) is plain HTML with a small script: no build step,
and every URL it names is relative to the service, so it works offline and behind a path
prefix. Its Content-Security-Policy allows this origin only: a browser refuses anything
else the page might name.

Its data is ``models/<version>/demo.json`` (training/demo.py, ``make demo-sample``): a few
users of the model's training data, each with a history and the candidate list recall made
for it, and the titles of those items. The file is made on each machine and never committed
or baked into an image (it holds the data's titles and histories); without it,
``/demo/sample.json`` is a 404 whose detail names the command, and the page shows that.

The page sends the history in each ``/rerank`` request's ``history`` field and keeps the
films a visitor clicks in the browser. So the demo reads no stored history, and visitors
never see each other's clicks; a reload starts over. Its form for a new film calls
``POST /items``, the one thing the page writes: the film's vector, under a fresh id.

``RERANK_DEMO=false`` leaves all of this out: ``/demo`` is then 404 like any unknown path.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from app.config import Settings
from contract import DEMO_FILE, default_version

STATIC = Path(__file__).parent / "static"
PAGE = STATIC / "demo.html"
ASSETS = "/demo/assets"  # the script and the style sheet, app/static/demo/
# Same origin only. 'unsafe-inline' nowhere: the script sets styles through the CSSOM,
# which a style-src without it allows.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def sample_path(model_dir: Path, served: str | None) -> Path | None:
    """The demo file of the served version, else of the default version; None if neither
    folder has one."""
    for version in (served, default_version(model_dir)):
        if version:
            path = model_dir / version / DEMO_FILE
            if path.is_file():
                return path
    return None


def _served_version(request: Request) -> str | None:
    holder = getattr(request.app.state, "holder", None)  # set once the lifespan has run
    model = holder.model if holder is not None else None
    return model.version if model is not None else None


def install_demo(app: FastAPI, settings: Settings) -> None:
    """Add /demo, its assets and /demo/sample.json, when ``settings.demo`` is on."""
    if not settings.demo:
        return
    app.mount(ASSETS, StaticFiles(directory=STATIC / "demo"), name="demo-assets")

    @app.get("/demo", include_in_schema=False)
    async def demo_page() -> Response:
        return FileResponse(PAGE, media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/demo/sample.json", include_in_schema=False)
    async def demo_sample(request: Request) -> Response:
        path = sample_path(settings.model_dir, _served_version(request))
        if path is None:
            detail = (
                f"no {DEMO_FILE} in the served or the default model folder under "
                f"{settings.model_dir}: make it with `make demo-sample` (or `rerank "
                "demo-sample --model models/<version>`, which fetches MovieLens), then reload"
            )
            return JSONResponse({"detail": detail}, status_code=404)
        return FileResponse(
            path, media_type="application/json", headers={"Cache-Control": "no-cache"}
        )
