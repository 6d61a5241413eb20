"""The dashboard in a real browser, the whole path of a new user: sign up → create a key → copy it →
the workbench streams with it → disable it → the workbench shows the refusal → the usage page counts
the requests. And the account pages' own messages: a taken email, a wrong password."""

from __future__ import annotations

import re

from tests.web.conftest import PHONE, screenshot
from tests.web.helpers import PASSWORD, answer_stats, ask, sign_up


def test_a_new_user_signs_up_makes_a_key_uses_it_disables_it_and_sees_the_usage(open_page):
    page, watch = open_page()
    page.on("dialog", lambda dialog: dialog.accept(*(["laptop key"] if dialog.type == "prompt" else [])))
    sign_up(page, "new@example.com")
    assert page.is_visible("#nav a[data-page=keys]")

    page.fill("#key-name", "laptop")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#new-secret:not([hidden])")
    assert "shown only once" in page.text_content("#new-secret")
    secret = page.text_content("#secret-value")
    assert secret.startswith("msk-")
    page.click("#copy-secret")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    row = page.locator("#keys-table tbody tr", has_text="laptop")
    assert "enabled" in row.text_content() and secret not in row.text_content()
    screenshot(page, "keys-new-secret-laptop")
    page.click("#dismiss-secret")
    assert secret not in page.content()  # shown once

    page.click("#nav a[data-page=workbench]")
    page.fill("#api-key", page.evaluate("navigator.clipboard.readText()"))
    page.locator("#params [data-param=max_tokens] input.value").fill("6")
    ask(page, "Hello from a new account")
    assert answer_stats(page).startswith("6 tokens")

    page.click("#nav a[data-page=keys]")
    row = page.locator("#keys-table tbody tr", has_text="laptop")
    row.locator("button.rename-key").click()
    row = page.locator("#keys-table tbody tr", has_text="laptop key")
    row.locator("button.toggle-key").click()
    page.wait_for_function("() => /disabled/.test(document.querySelector('#keys-table tbody tr').textContent)")
    assert row.locator("button.toggle-key").text_content() == "Enable"

    watch.expect_error(r"status of 401")
    page.click("#nav a[data-page=workbench]")
    ask(page, "Am I still allowed?")
    page.wait_for_selector("#notice:not([hidden])")
    assert "refused the API key" in page.text_content("#notice")
    screenshot(page, "workbench-disabled-key-laptop")

    page.click("#nav a[data-page=usage]")
    page.wait_for_function(
        "() => { const t = document.querySelector('#usage-by-key tbody'); if (!/laptop key/.test(t?.textContent))"
        " { document.querySelector('#usage-form button').click(); return false; } return true; }", polling=500,
        timeout=30_000)
    cells = page.locator("#usage-by-key tbody tr", has_text="laptop key").locator("td").all_text_contents()
    assert int(re.sub(r"\D", "", cells[1])) >= 1  # requests
    assert page.locator("#usage-chart svg rect.bar").count() == 30
    assert page.locator("#usage-by-model tbody tr").count() >= 1
    screenshot(page, "usage-after-refusal-laptop")

    page.click("#nav a[data-page=keys]")
    page.locator("#keys-table tbody tr", has_text="laptop key").locator("button.delete-key").click()
    page.wait_for_selector("#keys-table td.empty")

    page.click("#nav a[data-page=account]")
    page.click("#logout")
    page.wait_for_selector("#account-out:not([hidden])")
    assert not page.is_visible("#nav a[data-page=keys]")


def test_a_taken_email_and_a_wrong_password_get_clear_messages(open_page):
    page, watch = open_page(viewport=PHONE)
    watch.expect_error(r"status of 401")
    sign_up(page, "taken@example.com")
    page.click("#nav a[data-page=account]")
    page.click("#logout")
    page.wait_for_selector("#account-out:not([hidden])")
    page.fill("#auth-email", "taken@example.com")
    page.fill("#auth-password", "another password")
    page.click("#signup")
    page.wait_for_selector("#notice.error:not([hidden])")
    assert re.search(r"already", page.text_content("#notice"), re.I)
    page.fill("#auth-password", "not the password")
    page.click("#login")
    page.wait_for_function("() => /password|credentials/i.test(document.querySelector('#notice').textContent)")
    screenshot(page, "account-phone-error")
    page.fill("#auth-password", PASSWORD)
    page.click("#login")
    page.wait_for_selector("#page-keys:not([hidden])")
    for name in ("keys", "usage"):  # at phone width too, nothing overflows
        page.click(f"#nav a[data-page={name}]")
        page.wait_for_selector(f"#page-{name}:not([hidden]) table tbody tr")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], name
        screenshot(page, f"{name}-relogged-phone")
