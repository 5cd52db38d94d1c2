"""The inspector page as shipped: one static file, nothing fetched from elsewhere, a CSP that admits
exactly its own inline script and style, a label for every field."""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser

from services.serve.inspector.page import INSPECTOR_PAGE


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags() -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(INSPECTOR_PAGE.html)
    return p.tags


def test_the_page_is_packaged_and_fetches_nothing_from_elsewhere():
    html = INSPECTOR_PAGE.html
    assert html.startswith("<!doctype html>") and "</html>" in html
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.I)  # no absolute URL at all
    for tag, attrs in _tags():
        assert "src" not in attrs, tag  # no external script, image or frame
        assert tag != "link" or attrs.get("href") == "data:,"
    csp = INSPECTOR_PAGE.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


def test_csp_names_the_hash_of_each_inline_block():
    csp = INSPECTOR_PAGE.headers["Content-Security-Policy"]
    blocks = re.findall(r"<(script|style)>(.*?)</\1>", INSPECTOR_PAGE.html, re.S)
    assert sorted(k for k, _ in blocks) == ["script", "style"]
    for kind, body in blocks:
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{kind}-src 'sha256-{digest}'" in csp
    assert not re.search(r"\son[a-z]+=", INSPECTOR_PAGE.html)  # no inline handlers (the CSP would block them)
    assert " style=" not in INSPECTOR_PAGE.html


def test_every_field_has_a_label_and_actions_are_buttons():
    tags = _tags()
    labelled = {a.get("for") for t, a in tags if t == "label"}
    fields = [a.get("id") for t, a in tags if t in ("input", "select", "textarea")]
    assert fields and all(f in labelled for f in fields), (fields, labelled)
    assert all(a.get("type") in ("button", "submit") for t, a in tags if t == "button")
    assert 'el("details"' in INSPECTOR_PAGE.html  # expanders are native <details> (keyboard: Enter/Space)
    assert ":focus-visible" in INSPECTOR_PAGE.html
    assert INSPECTOR_PAGE.response(401).headers["www-authenticate"] == "Bearer"
