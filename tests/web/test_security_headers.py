"""The pages keep to their own origin under a strict policy: every page and static file carries it, and
nothing in them needs more (no inline script, handler or style attribute, no eval). The browser tests
load the pages under this very policy and fail on any console error, a refused script included."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

WEB_FILES = Path(__file__).resolve().parents[2] / "src" / "mistral_serve" / "web"
PAGES = ["/", *(f"/static/{path.name}" for path in sorted(WEB_FILES.iterdir()) if path.is_file())]


def directives(policy: str) -> dict[str, str]:
    return {part.split()[0]: part.strip() for part in policy.split(";") if part.strip()}


@pytest.mark.parametrize("path", PAGES)
def test_every_page_and_file_carries_the_strict_policy(web_server, path):
    response = httpx.get(web_server.url + path)
    assert response.status_code == 200
    policy = directives(response.headers["content-security-policy"])
    assert policy["default-src"] == "default-src 'self'" and policy["script-src"] == "script-src 'self'"
    assert policy["frame-ancestors"] == "frame-ancestors 'none'" and policy["object-src"] == "object-src 'none'"
    assert not any("unsafe" in value or "*" in value or "http" in value for value in policy.values()), policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


def test_the_page_needs_nothing_the_policy_refuses():
    html = (WEB_FILES / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)  # inline script
    assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE)  # inline handler: onclick=…
    assert not re.search(r"\sstyle\s*=", html, re.IGNORECASE)  # style attribute
    assert "javascript:" not in html.lower()
    for script in WEB_FILES.glob("*.js"):
        code = script.read_text()
        assert not re.search(r"\beval\s*\(|new\s+Function\s*\(|\.innerHTML\s*=|\.outerHTML\s*=", code), script
        assert not re.search(r"""setAttribute\(\s*["'](on[a-z]+|style)["']""", code), script
        assert not re.search(r"set(Timeout|Interval)\(\s*[\"'`]", code), script  # code in a string


@pytest.mark.parametrize("method, path, content", [
    ("GET", "/static/../api/app.py", b""), ("GET", "/static/%2e%2e/api/app.py", b""), ("GET", "/nowhere", b""),
    ("GET", "/v1/models", b""), ("POST", "/api/account/login", b"x" * (5 << 20)),
])
def test_api_answers_and_errors_are_not_sniffed_either(web_server, method, path, content):
    response = httpx.request(method, web_server.url + path, content=content,
                             headers={"Content-Type": "application/json"})
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-type"].startswith("application/json")
    assert response.status_code in (200, 404, 413)
