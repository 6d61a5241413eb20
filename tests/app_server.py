"""An ASGI app under a real uvicorn in a thread, for tests that need it on a loopback port. Torch-free:
the upstream tests use it without loading a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import threading
import time

import uvicorn


@contextmanager
def serving(app, *, port: int = 0, **config) -> Iterator[str]:
    """`app` on a loopback port (a free one by default) until the block ends: yields its base URL.
    `config`: more of uvicorn.Config's options."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
