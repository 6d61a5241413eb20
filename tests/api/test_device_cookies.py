"""Device cookies: each names one email and is worth nothing altered or for another; the server's
secret is made once, private, and the same for every process that shares the data folder."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from http.cookies import SimpleCookie

import pytest
from starlette.requests import Request
from starlette.responses import Response

from mistral_serve.api.device_cookies import DEVICE_COOKIE, SECRET_FILE, DeviceCookies, load_secret


def request_with(cookie: str | None) -> Request:
    headers = [(b"cookie", f"{DEVICE_COOKIE}={cookie}".encode())] if cookie is not None else []
    return Request({"type": "http", "method": "POST", "path": "/api/account/login", "headers": headers})


def issued(devices: DeviceCookies, email: str, request: Request | None = None) -> str:
    response = Response()
    devices.set_cookie(request or request_with(None), response, email, is_https=False)
    return SimpleCookie(response.headers["set-cookie"])[DEVICE_COOKIE].value


def test_a_cookie_names_one_email_and_is_worth_nothing_altered(tmp_path):
    devices = DeviceCookies.in_data_dir(tmp_path)
    cookie = issued(devices, "owner@example.com")
    device_id = devices.device_of(request_with(cookie), "owner@example.com")
    assert device_id and device_id in cookie
    assert devices.device_of(request_with(cookie), "other@example.com") is None
    assert devices.device_of(request_with(None), "owner@example.com") is None
    for forged in (cookie[:-1] + ("0" if cookie[-1] != "0" else "1"), "x" + cookie, cookie.split(".")[0],
                   f"{device_id}.", ".", ""):
        assert devices.device_of(request_with(forged), "owner@example.com") is None, forged
    # another server's secret: not one of ours
    elsewhere = DeviceCookies.in_data_dir(tmp_path / "elsewhere")
    assert elsewhere.device_of(request_with(cookie), "owner@example.com") is None
    # logging in again from the same browser keeps its device
    assert devices.device_of(request_with(issued(devices, "owner@example.com", request_with(cookie))),
                             "owner@example.com") == device_id
    assert issued(devices, "owner@example.com") != cookie  # a new browser, a new device


def test_the_secret_is_made_once_private_and_shared_by_processes_starting_together(tmp_path):
    path = tmp_path / "data" / SECRET_FILE
    with ThreadPoolExecutor(8) as pool:
        secrets = set(pool.map(lambda _: load_secret(path), range(8)))
    assert len(secrets) == 1 and len(secrets.pop()) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert [entry.name for entry in path.parent.iterdir()] == [SECRET_FILE]  # no draft left behind
    cookie = issued(DeviceCookies.in_data_dir(tmp_path / "data"), "owner@example.com")
    assert DeviceCookies.in_data_dir(tmp_path / "data").device_of(request_with(cookie), "owner@example.com")


def test_a_damaged_secret_file_is_an_error_that_says_what_to_do(tmp_path):
    (tmp_path / SECRET_FILE).write_text("not hex")
    with pytest.raises(ValueError, match="delete it"):
        DeviceCookies.in_data_dir(tmp_path)
