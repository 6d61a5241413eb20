"""Secrets: API key generation and hashing, password hashing, web session tokens.

An API key is `msk-` + 256 random bits (URL-safe base64); only its SHA-256 hash is stored. A key is
already high-entropy, so a fast hash is right for it; passwords are not, so they get Argon2id.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

API_KEY_PREFIX = "msk-"
NUM_KEY_BYTES = 32  # 256 bits of randomness
NUM_PREFIX_CHARS = 8  # the part after "msk-" that users see to tell their keys apart
NUM_TOKEN_BYTES = 32  # a session or CSRF token: 256 random bits
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024  # hashing a megabyte of "password" is a denial of service, not a password

# Argon2id with OWASP's recommended minimum: 19 MiB of memory, 2 iterations, 1 lane
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16)


def generate_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(NUM_KEY_BYTES)


def hash_api_key(raw_key: str) -> str:
    """SHA-256 hex of the whole key, as stored and looked up."""
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def api_key_prefix(raw_key: str) -> str:
    """The short, non-secret part shown in listings: the first characters after `msk-`."""
    if not raw_key.startswith(API_KEY_PREFIX):
        raise ValueError(f"an API key starts with {API_KEY_PREFIX!r}")
    return raw_key[len(API_KEY_PREFIX):][:NUM_PREFIX_CHARS]


def generate_token() -> str:
    """A random, URL-safe token: a session cookie's or a CSRF cookie's value."""
    return secrets.token_urlsafe(NUM_TOKEN_BYTES)


def hash_session_token(token: str) -> str:
    """SHA-256 hex of a session token, as stored and looked up (the token itself is never stored)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PasswordCheck:
    is_valid: bool
    needs_rehash: bool  # valid, but hashed with older parameters: store hash_password(password) now


def check_new_password(password: str) -> None:
    """Raise ValueError unless `password` may be set as an account's password."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"a password has at most {MAX_PASSWORD_CHARS} characters")


def hash_password(password: str) -> str:
    check_new_password(password)
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> PasswordCheck:
    """Check `password` against a stored hash. `None` (an unknown email, or an account without a
    password) is checked against a dummy hash, so that every answer costs the same time."""
    if password_hash is None:
        _verify(_dummy_hash(), password)
        return PasswordCheck(is_valid=False, needs_rehash=False)
    if not _verify(password_hash, password):
        return PasswordCheck(is_valid=False, needs_rehash=False)
    return PasswordCheck(is_valid=True, needs_rehash=_hasher.check_needs_rehash(password_hash))


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password[:MAX_PASSWORD_CHARS + 1])
    except (VerificationError, InvalidHashError):
        return False


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))
