"""The acceptance path of the web issue in ONE browser session, in order: sign up → create a key → copy
it → the workbench streams an answer with it → Stop keeps the partial text → compare parameter sets →
the API tab's snippets, executed, succeed and send the same body → disable the key on the keys page →
the workbench shows the refusal → the usage page shows the requests. On the way, every page is
screenshotted at 1280×800 and 390×844 (test-artifacts/screenshots/<page>-<laptop|phone>.png) and
checked for horizontal overflow. And Compare with a third pane ("+ pane"), all three run together."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.web.conftest import LAPTOP, PHONE, screenshot
from tests.web.helpers import ANSWER, answer_stats, ask, run_compare, set_param, sign_up

SIZES = {"laptop": LAPTOP, "phone": PHONE}

# Elements that stick out of the viewport on the right, unless a scrolling or clipping box holds them.
OVERFLOWING = """() => {
  const width = document.documentElement.clientWidth;
  const clipped = (el) => {
    for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
      if (/(auto|scroll|hidden|clip)/.test(getComputedStyle(p).overflowX)) return true;
    }
    return false;
  };
  const out = [];
  for (const el of document.querySelectorAll("body *")) {
    const box = el.getBoundingClientRect();
    if (!box.width || !box.height || el.closest("[hidden]")) continue;
    if (box.right > width + 1 && !clipped(el)) out.push(`${el.tagName}#${el.id}.${el.className} right=${box.right}`);
  }
  return { scrollWidth: document.documentElement.scrollWidth, width, out: out.slice(0, 5) };
}"""


def go(page, name: str) -> None:
    page.click(f"#nav a[data-page={name}]")
    page.wait_for_selector(f"#page-{name}:not([hidden])")


def fits_and_shoot(page, name: str) -> None:
    """Screenshots the page shown now at both sizes, each checked for horizontal overflow; the viewport
    ends at laptop size."""
    for size, viewport in (("phone", PHONE), ("laptop", LAPTOP)):
        page.set_viewport_size(viewport)
        page.wait_for_timeout(50)  # a layout pass after the resize
        found = page.evaluate(OVERFLOWING)
        assert found["scrollWidth"] <= viewport["width"] and not found["out"], f"{name} at {size}: {found}"
        screenshot(page, f"{name}-{size}")


def test_the_acceptance_path_in_one_session_with_every_page_at_both_sizes(open_page, web_server):
    page, watch = open_page()
    go(page, "account")
    fits_and_shoot(page, "signup")  # the sign up / log in form

    # sign up → create key → copy it
    sign_up(page, "acceptance@example.com")
    page.fill("#key-name", "acceptance")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#new-secret:not([hidden])")
    secret = page.text_content("#secret-value")
    assert secret.startswith("msk-")
    page.click("#copy-secret")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    fits_and_shoot(page, "keys")
    page.click("#dismiss-secret")
    go(page, "account")
    fits_and_shoot(page, "account")  # logged in

    # the workbench streams an answer with the copied key
    go(page, "workbench")
    page.fill("#api-key", page.evaluate("navigator.clipboard.readText()"))
    set_param(page, "max_tokens", 6)
    ask(page, "Hello from the acceptance path")
    assert re.fullmatch(r"6 tokens · TTFT \d+ ms · [\d.]+ tok/s · finish: length", answer_stats(page))

    # Stop keeps the partial text
    set_param(page, "max_tokens", "")
    set_param(page, "logit_bias", '{"0": -100}')  # no end of sequence: it would run to the context's end
    ask(page, "Tell me everything")
    page.wait_for_function("s => document.querySelector(s + ' .text')?.textContent.length > 20",
                           arg="#conversation .message.streaming", timeout=30_000)
    page.click("#stop")
    assert answer_stats(page).endswith("stopped by you")
    partial = page.locator(ANSWER + " .text").text_content()
    assert len(partial) > 20
    page.wait_for_timeout(300)
    assert page.locator(ANSWER + " .text").text_content() == partial  # nothing more arrives
    fits_and_shoot(page, "workbench")
    set_param(page, "logit_bias", "")
    set_param(page, "max_tokens", 5)

    # compare two parameter sets on the same conversation
    go(page, "compare")
    bodies = run_compare(page, web_server, {"max_tokens": 3, "temperature": 0}, {"max_tokens": 4, "seed": 7})
    assert [(b["max_tokens"], b.get("temperature"), b.get("seed")) for b in bodies] == [(3, 0, None), (4, None, 7)]
    assert bodies[0]["messages"] == bodies[1]["messages"]
    assert bodies[0]["messages"][-1] == {"role": "user", "content": "Which is better?"}
    fits_and_shoot(page, "compare")

    # the API tab's snippets, run as shown, succeed and send the body the workbench sent
    go(page, "workbench")
    ask(page, "One more, for the API tab")
    answer_stats(page)
    sent = web_server.chat_bodies[-1]
    go(page, "api")
    page.check("#include-key")
    for lang, command in (("curl", ["bash"]), ("requests", [sys.executable]), ("openai", [sys.executable])):
        page.click(f"#snippet-tabs [data-lang={lang}]")
        code = page.text_content("#snippet")
        assert secret in code
        num_before = len(web_server.chat_bodies)
        done = subprocess.run([*command, "-c", code], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OPENAI_BASE_URL": "", "OPENAI_API_KEY": ""})
        assert done.returncode == 0, f"{lang}:\n{code}\n{done.stderr}"
        assert web_server.chat_bodies[num_before:] == [sent], lang
    page.uncheck("#include-key")
    assert secret not in page.text_content("#snippet")
    fits_and_shoot(page, "api")

    # disable the key on the keys page → the workbench shows the refusal
    go(page, "keys")
    row = page.locator("#keys-table tbody tr", has_text="acceptance")
    row.locator("button.toggle-key").click()
    page.wait_for_function("() => /disabled/.test(document.querySelector('#keys-table tbody tr').textContent)")
    watch.expect_error(r"status of 401")
    go(page, "workbench")
    ask(page, "Am I still allowed?")
    page.wait_for_selector("#notice:not([hidden])")
    assert "refused the API key" in page.text_content("#notice")

    # the usage page shows the requests: 2 answers + 1 stopped + 2 compared + 1 more + 3 snippets
    go(page, "usage")
    page.wait_for_function(
        "() => { const t = document.querySelector('#usage-by-key tbody'); if (!/acceptance/.test(t?.textContent))"
        " { document.querySelector('#usage-form button').click(); return false; } return true; }", polling=500,
        timeout=30_000)
    cells = page.locator("#usage-by-key tbody tr", has_text="acceptance").locator("td").all_text_contents()
    assert int(re.sub(r"\D", "", cells[1])) >= 8, cells  # requests
    assert page.locator("#usage-chart svg rect.bar").count() == 30
    fits_and_shoot(page, "usage")


def test_compare_runs_three_panes_together(open_page, web_server, api_key):
    page, _ = open_page()
    page.fill("#api-key", api_key)
    go(page, "compare")
    assert page.locator(".pane .remove-pane").count() == 0  # two panes at least
    page.click("#compare-add")
    assert page.locator("#panes .pane").count() == 3
    for pane, num_tokens in (("0", 2), ("1", 3), ("2", 4)):
        set_param(page, "max_tokens", num_tokens, root=f"[data-pane='{pane}']")
    num_before = len(web_server.chat_bodies)
    page.fill("#compare-prompt", "Three ways")
    page.click("#compare-run")
    for pane, num_tokens in (("0", 2), ("1", 3), ("2", 4)):
        page.wait_for_function("s => /finish/.test(document.querySelector(s)?.textContent)",
                               arg=f"[data-pane='{pane}'] .stats", timeout=60_000)
        assert page.locator(f"[data-pane='{pane}'] .stats").text_content().startswith(f"{num_tokens} tokens")
    bodies = web_server.chat_bodies[num_before:]
    assert sorted(b["max_tokens"] for b in bodies) == [2, 3, 4]
    assert all(b["messages"] == bodies[0]["messages"] for b in bodies)
    fits_and_shoot(page, "compare-three")
    page.reload()  # the third pane is part of the saved state
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#panes .pane").count() == 3
    page.locator("[data-pane='2'] .remove-pane").click()
    assert page.locator("#panes .pane").count() == 2
    assert page.locator(".pane .remove-pane").count() == 0
