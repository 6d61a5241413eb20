"""A gateway that serves only remote models never loads torch, the engine or the API to do it."""

import json
import subprocess
import sys


def test_the_pool_imports_neither_torch_nor_the_rest_of_the_server():
    script = ("import json, sys; import mistral_serve.upstream.pool, mistral_serve.upstream.config; "
              "print(json.dumps(sorted(sys.modules)))")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = json.loads(ran.stdout)
    assert not [name for name in loaded if name.split(".")[0] in ("torch", "fastapi", "starlette", "pydantic")]
    assert "mistral_serve.upstream.pool" in loaded
    assert not [name for name in loaded
                if name.startswith("mistral_serve.") and not name.startswith("mistral_serve.upstream")]
