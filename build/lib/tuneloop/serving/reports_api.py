"""`GET /reports/<path>`: saved reports (Evidently drift pages) from the data dir, behind the admin token.

Only files under <data_dir>/reports are served; a path that leaves it (.., absolute, symlink out) is a 404 like a
missing file, so the route cannot be used to probe the disk. Captured text inside a report is already escaped
when the report is written (monitor/html_report.py).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from tuneloop.serving.protocol import error_response
from tuneloop.serving.state import context


def resolve_report(reports_dir: Path, relative: str) -> Path | None:
    root = reports_dir.resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, ValueError):
        return None
    if root not in path.parents or not path.is_file() or path.suffix not in (".html", ".json"):
        return None
    return path


async def report(request: Request) -> Response:
    ctx = context(request)
    await ctx.auth.require(request, "admin")
    relative = request.path_params["path"]
    path = resolve_report(ctx.config.data_path / "reports", relative)
    if path is None:
        return error_response(404, f"no report '{relative}' (paths are relative to <data_dir>/reports, as "
                                   "`tuneloop drift --json` prints them in report_path)", "not_found")
    media = "text/html; charset=utf-8" if path.suffix == ".html" else "application/json"
    return FileResponse(path, media_type=media, headers={"X-Content-Type-Options": "nosniff",
                                                         "Cache-Control": "no-store"})


def routes() -> list[BaseRoute]:
    return [Route("/reports/{path:path}", report, methods=["GET"])]
