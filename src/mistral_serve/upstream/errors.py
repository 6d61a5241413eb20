"""What a pool raises, each answered differently by the gateway."""

from __future__ import annotations


class NoHealthyUpstreamError(RuntimeError):
    """No member could take the request: none is in rotation, or every one tried failed before its
    first event. The gateway answers 503 with Retry-After."""

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UpstreamBrokenError(RuntimeError):
    """The upstream failed after its stream began: the connection was lost, the body was cut, or an
    event was not JSON. Nothing is retried: the client has seen part of the answer."""


class UpstreamRefusedError(RuntimeError):
    """The upstream refused this request for its content (400, 413, 422 …): relayed to the client
    with the upstream's JSON body. Another upstream would refuse it too, so nothing is retried."""

    def __init__(self, status_code: int, body: dict | None):
        super().__init__(f"the upstream refused the request: HTTP {status_code}")
        self.status_code = status_code
        self.body = body


class UpstreamMisconfiguredError(RuntimeError):
    """Every member tried answered 401, 403, 404 or a redirect: our configuration is wrong (token,
    model name, URL), not the client's request. The gateway answers 502 and never relays the
    upstream's answer."""


def describe(error: BaseException) -> str:
    """An exception in a few words for logs and status (httpx's timeouts carry no message)."""
    if isinstance(error, UpstreamBrokenError):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
