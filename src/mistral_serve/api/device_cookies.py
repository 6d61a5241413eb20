"""Device cookies: a browser that has logged in to an account before is known when it tries again.

After a successful log-in the server sets `msv_device` = a random device id and an HMAC-SHA256 of
that id and the account's email under a secret of the server's. Only that browser holds the cookie
and it names one email: a guesser who tries the owner's email from anywhere else cannot have it, so
the log-in brake counts the owner's attempts from this browser apart from everyone else's
(`api/login_throttle.py`). Nothing is stored per device: a cookie is checked by recomputing its HMAC.

The secret is 32 random bytes made on first use in the data folder (`device-cookie-secret`, readable
by its user alone). Replicas recognise each other's cookies when they share that file; where they do
not, a cookie from another replica is simply not trusted, and its holder is braked as a stranger.
"""

from __future__ import annotations

from datetime import timedelta
import hashlib
import hmac
import os
from pathlib import Path
import secrets

from fastapi import Request, Response

DEVICE_COOKIE = "msv_device"
DEVICE_COOKIE_PATH = "/api/account"  # sent to the account routes only
DEVICE_LIFETIME = timedelta(days=365)
SECRET_FILE = "device-cookie-secret"
SECRET_BYTES = 32


class DeviceCookies:
    def __init__(self, secret: bytes):
        self.secret = secret

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> DeviceCookies:
        return cls(load_secret(data_dir.expanduser() / SECRET_FILE))

    def device_of(self, request: Request, email: str) -> str | None:
        """The id of the device cookie that `request` carries, if that cookie was issued for `email`."""
        device_id, _, mac = request.cookies.get(DEVICE_COOKIE, "").partition(".")
        if device_id and hmac.compare_digest(mac.encode(), self._mac(device_id, email).encode()):
            return device_id
        return None

    def set_cookie(self, request: Request, response: Response, email: str, *, is_https: bool) -> None:
        """Mark this browser as one `email` logged in from; a browser already marked for it keeps its id."""
        device_id = self.device_of(request, email) or secrets.token_urlsafe(16)
        response.set_cookie(DEVICE_COOKIE, f"{device_id}.{self._mac(device_id, email)}", path=DEVICE_COOKIE_PATH,
                            max_age=int(DEVICE_LIFETIME.total_seconds()), httponly=True, samesite="strict",
                            secure=is_https)

    def _mac(self, device_id: str, email: str) -> str:
        message = f"{device_id}\n{email}".encode("utf-8", "surrogatepass")
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()


def load_secret(path: Path) -> bytes:
    """The secret in `path`, made there first if missing: created private (0600) under a temporary name,
    then linked into place, so that two processes starting together end up with the same secret and
    none ever reads a half-written one."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(draft, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(SECRET_BYTES))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process made it first: theirs is the one
        finally:
            draft.unlink()
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except ValueError:
        secret = b""
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"{path} holds no secret of {SECRET_BYTES} bytes: delete it and a new one is made")
    return secret
