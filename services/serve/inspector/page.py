"""The inspector page: one static HTML file (inline CSS and vanilla JS, no build step) that holds no
data. It asks for an API key and reads everything through the authorised JSON endpoints.

Its Content-Security-Policy allows exactly its own inline script and style (by sha256) and requests
to this origin, so nothing is fetched from elsewhere at run time and injected markup cannot run."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cached_property
from importlib import resources

from fastapi.responses import HTMLResponse

_BLOCK = re.compile(r"<(script|style)>(.*?)</\1>", re.S)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


class StaticPage:
    """A packaged HTML file served with a CSP naming its inline blocks."""

    def __init__(self, package: str, name: str) -> None:
        self.package, self.name = package, name

    @cached_property
    def html(self) -> str:
        return resources.files(self.package).joinpath(self.name).read_text(encoding="utf-8")

    @cached_property
    def headers(self) -> dict[str, str]:
        hashes: dict[str, list[str]] = {"script": [], "style": []}
        for kind, body in _BLOCK.findall(self.html):
            hashes[kind].append(_sha256(body))
        script, style = (" ".join(hashes[k]) or "'none'" for k in ("script", "style"))
        csp = (f"default-src 'none'; script-src {script}; style-src {style}; "
               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

    def response(self, status: int = 200) -> HTMLResponse:
        headers = dict(self.headers)
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return HTMLResponse(self.html, status_code=status, headers=headers)


INSPECTOR_PAGE = StaticPage("services.serve.inspector", "static/inspector.html")
