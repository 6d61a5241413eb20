"""The workbench in a real browser: parameters from the schema, streaming, Stop, Compare, the API tab
(whose code, run as shown, sends the body the workbench sent), reload and share, refusals, phone width."""

from __future__ import annotations

import os
from pathlib import Path
import re
import subprocess
import sys

import httpx

from tests.api.conftest import CONTEXT_LENGTH, MODEL_ID, wait_until
from tests.web.conftest import LAPTOP, PHONE, screenshot
from tests.web.helpers import ANSWER, answer_stats, ask, run_compare, set_param

WEB_FILES = Path(__file__).resolve().parents[2] / "src" / "mistral_serve" / "web"


def test_the_page_loads_only_its_own_files_under_a_strict_policy(web_server):
    response = httpx.get(web_server.url + "/")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert httpx.get(web_server.url + "/static/../api/app.py").status_code == 404
    for path in WEB_FILES.iterdir():  # no script, style or font from elsewhere, no inline script
        text = path.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path
        assert not re.search(r"url\(\s*['\"]?(https?:)?//|@import", text), path
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), path


def test_parameters_are_rendered_from_the_schema_and_max_tokens_is_clamped(open_page):
    page, _ = open_page()
    temperature = page.locator("#params [data-param=temperature]")
    assert temperature.locator("input[type=range]").get_attribute("max") == "2"
    assert temperature.locator("input.value").input_value() == "1"
    assert page.locator("#params [data-param=logprobs] input.toggle").count() == 1
    page.click("#params [data-param=stop] .add-stop")
    assert page.locator("#params [data-param=stop] .stop input").count() == 1
    set_param(page, "max_tokens", 99999)
    assert page.locator("#params [data-param=max_tokens] input.value").input_value() == str(CONTEXT_LENGTH - 1)
    screenshot(page, "workbench-params-laptop")


def test_an_answer_streams_with_its_numbers_and_the_state_survives_a_reload(open_page, web_server, api_key):
    page, _ = open_page()
    page.fill("#api-key", api_key)
    page.fill("#system-prompt", "Be brief.")
    set_param(page, "max_tokens", 12)
    set_param(page, "temperature", 0.5)
    ask(page, "Hello there")
    stats = answer_stats(page)
    assert re.fullmatch(r"12 tokens · TTFT \d+ ms · [\d.]+ tok/s · finish: length", stats), stats
    assert web_server.chat_bodies[-1] == {
        "model": MODEL_ID, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        "max_tokens": 12, "temperature": 0.5, "stream": True, "stream_options": {"include_usage": True}}
    first_answer = page.locator(ANSWER + " .text").text_content()
    assert first_answer

    ask(page, "And again")  # a second turn carries the first answer
    answer_stats(page)
    assert [m["role"] for m in web_server.chat_bodies[-1]["messages"]] == ["system", "user", "assistant", "user"]
    assert web_server.chat_bodies[-1]["messages"][2]["content"] == first_answer

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#conversation .message").count() == 4
    assert page.input_value("#system-prompt") == "Be brief."
    assert page.locator("#params [data-param=max_tokens] input.value").input_value() == "12"
    assert page.input_value("#api-key") == ""  # not remembered unless asked to

    page.click("#share")
    link = page.input_value("#share-url")
    assert api_key not in link
    other, _ = open_page(path=link.removeprefix(web_server.url))
    assert other.locator("#conversation .message").count() == 4
    assert other.locator("#params [data-param=temperature] input.value").input_value() == "0.5"


def test_stop_keeps_the_partial_text(open_page, api_key, engine):
    page, _ = open_page()
    page.fill("#api-key", api_key)
    set_param(page, "logit_bias", '{"0": -100}')  # no end of sequence: it would run to the context's end
    ask(page, "Tell me everything")
    page.wait_for_function("s => document.querySelector(s + ' .text')?.textContent.length > 20",
                           arg="#conversation .message.streaming", timeout=30_000)
    page.click("#stop")
    stats = answer_stats(page)
    assert stats.endswith("stopped by you"), stats
    partial = page.locator(ANSWER + " .text").text_content()
    assert len(partial) > 20
    assert wait_until(lambda: engine.num_kv_blocks_used == 0, 10)  # the server stopped generating too
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator(ANSWER + " .text").text_content() == partial


def test_compare_runs_two_parameter_sets_on_the_same_conversation(open_page, web_server, api_key):
    page, _ = open_page()
    page.fill("#api-key", api_key)
    page.click("#nav a[data-page=compare]")
    bodies = run_compare(page, web_server, {"max_tokens": 4, "temperature": 0}, {"max_tokens": 7, "seed": 7})
    assert [{k: v for k, v in b.items() if k not in ("model", "messages", "stream", "stream_options")} for b in bodies] \
        == [{"max_tokens": 4, "temperature": 0}, {"max_tokens": 7, "seed": 7}]
    assert bodies[0]["messages"] == bodies[1]["messages"] == [{"role": "user", "content": "Which is better?"}]
    screenshot(page, "compare-two-laptop")


def test_the_api_tab_code_sends_the_request_the_workbench_sent(open_page, web_server, api_key, tmp_path):
    page, _ = open_page()
    page.fill("#api-key", api_key)
    set_param(page, "max_tokens", 5)
    set_param(page, "top_k", 40)  # not an OpenAI argument: the openai snippet passes it in extra_body
    page.click("#params [data-param=stop] .add-stop")
    page.fill("#params [data-param=stop] .stop input", "it's \\n")
    ask(page, 'Say "hi" & \'bye\'')
    answer_stats(page)
    sent = web_server.chat_bodies[-1]
    assert sent["stop"] == ["it's \n"] and sent["top_k"] == 40

    page.click("#nav a[data-page=api]")
    for lang in ("curl", "requests", "openai"):
        page.click(f"#snippet-tabs [data-lang={lang}]")
        assert api_key not in page.text_content("#snippet")
    page.check("#include-key")
    page.click("#copy-snippet")  # the copy button puts exactly the shown code on the clipboard
    assert page.evaluate("navigator.clipboard.readText()") == page.text_content("#snippet")
    for lang, command in (("curl", ["bash"]), ("requests", [sys.executable]), ("openai", [sys.executable])):
        page.click(f"#snippet-tabs [data-lang={lang}]")
        code = page.text_content("#snippet")
        assert api_key in code
        script = tmp_path / f"{lang}.txt"
        script.write_text(code)
        num_before = len(web_server.chat_bodies)
        done = subprocess.run([*command, str(script)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OPENAI_BASE_URL": "", "OPENAI_API_KEY": ""})
        assert done.returncode == 0, f"{lang}:\n{code}\n{done.stderr}"
        assert web_server.chat_bodies[num_before:] == [sent], lang
        assert done.stdout.strip() or lang == "curl", lang
    screenshot(page, "api-with-key-laptop")


def test_a_refused_key_and_a_server_that_is_down_give_clear_messages(open_page):
    page, watch = open_page()
    watch.expect_error(r"status of 401")
    page.fill("#api-key", "msk-not-a-key")
    ask(page, "Hello")
    page.wait_for_selector("#notice:not([hidden])")
    assert "refused the API key" in page.text_content("#notice")
    assert page.locator("#conversation .message.user").count() == 1  # kept, to send again

    watch.expect_error(r"ERR_CONNECTION_REFUSED|ERR_FAILED")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.click("#send")
    page.wait_for_function("() => /Cannot reach the server/.test(document.querySelector('#notice').textContent)")
    screenshot(page, "workbench-refused-laptop")


def test_every_page_fits_a_phone_screen(open_page, api_key):
    page, _ = open_page(viewport=PHONE)
    page.fill("#api-key", api_key)
    set_param(page, "max_tokens", 3)
    ask(page, "A reply long enough to wrap " * 4)
    answer_stats(page)
    for name in ("workbench", "compare", "api", "account"):
        page.click(f"#nav a[data-page={name}]")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"{name} is {width} px wide"
        screenshot(page, f"{name}-after-answer-phone")
    assert LAPTOP["width"] > PHONE["width"]
