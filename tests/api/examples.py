"""The issue's own examples, verbatim, and how to run one against a server as a user would."""

from __future__ import annotations

import contextlib
import io

BASE_URL = "http://127.0.0.1:8000"
KEY = "<KEY>"

OPENAI_STYLE = '''
import requests
r = requests.post("http://127.0.0.1:8000/v1/chat/completions",
    headers={"Content-Type": "application/json", "Authorization": "Bearer <KEY>"},
    json={"model": "mistralai/Mistral-7B-Instruct-v0.3",
          "messages": [{"role": "user", "content": "Hello"}]})
print(r.json())
'''

OXEN_STYLE = '''
import requests
r = requests.post("http://127.0.0.1:8000/api/ai/chat/completions",
    headers={"Content-Type": "application/json", "Authorization": "Bearer <KEY>"},
    json={"model": "open-mistral-7b",
          "messages": [{"role": "user", "content": "Hello"}]})
print(r.json())
'''

OXEN_MODEL = '''
import requests
r = requests.get("http://127.0.0.1:8000/api/ai/models/open-mistral-7b",
    headers={"Authorization": "Bearer <KEY>"})
print(r.json())
'''

# the streaming variants: the same call with "stream": True, read line by line
OPENAI_STYLE_STREAM = '''
import requests
r = requests.post("http://127.0.0.1:8000/v1/chat/completions",
    headers={"Content-Type": "application/json", "Authorization": "Bearer <KEY>"},
    json={"model": "mistralai/Mistral-7B-Instruct-v0.3",
          "messages": [{"role": "user", "content": "Hello"}],
          "stream": True},
    stream=True)
for line in r.iter_lines():
    if line:
        print(line.decode())
'''

OXEN_STYLE_STREAM = OPENAI_STYLE_STREAM.replace("/v1/", "/api/ai/").replace(
    "mistralai/Mistral-7B-Instruct-v0.3", "open-mistral-7b")


def run_example(source: str, url: str, key: str, model: str | None = None) -> str:
    """Run an example as a user would, with only the base URL, the key (and the model id) swapped: its output."""
    source = source.replace(BASE_URL, url).replace(KEY, key)
    if model is not None:
        source = source.replace("mistralai/Mistral-7B-Instruct-v0.3", model).replace("open-mistral-7b", model)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(source, "<example>", "exec"), {})
    return output.getvalue()
