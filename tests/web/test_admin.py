"""The operator's page in a real browser: an operator logs in, sees every account's usage, makes a plan,
puts an account on it and edits it, makes an invitation, disables the account (whose key is refused
over HTTP at its next request, with the reason), and disables a key, which its owner then sees
disabled, with why, and cannot enable."""

from __future__ import annotations

import httpx

from mistral_serve.db import crud, plans
from mistral_serve.db.plans import PlanLimits
from tests.api.conftest import MODEL_ID, NO_EOS
from tests.web.conftest import PHONE, screenshot
from tests.web.helpers import PASSWORD, log_in


def ask(base_url: str, secret: str) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {secret}"},
                      json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                            "logit_bias": NO_EOS})


def account_row(page, email: str):
    return page.locator(f"#admin-accounts tbody tr[data-email='{email}']")


def test_an_operator_sees_usage_assigns_a_plan_and_disables_an_account(open_page, web_server, api_db):
    with api_db() as db:
        crud.create_account(db, "operator@example.com", PASSWORD, is_admin=True)
        customer = crud.create_account(db, "customer@example.com", PASSWORD)
        secret = crud.create_api_key(db, customer, "production")[1]
    answers = [ask(web_server.url, secret) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [200, 200]
    assert web_server.recorder.app.state.serving.usage.flush()
    tokens = sum(answer.json()["usage"]["total_tokens"] for answer in answers)

    page, _ = open_page()
    page.on("dialog", lambda dialog: dialog.accept(*(["unpaid invoice"] if dialog.type == "prompt" else [])))
    log_in(page, "operator@example.com")
    page.click("#nav a[data-page=operator]")
    row = account_row(page, "customer@example.com")
    row.wait_for()
    assert row.locator("td.recent-requests").text_content() == "2"
    assert row.locator("td.recent-tokens").text_content() == str(tokens)
    assert "operator" in account_row(page, "operator@example.com").text_content()
    assert account_row(page, "operator@example.com").locator("button.toggle-account").count() == 0  # not oneself

    page.fill("#plan-name", "Team")
    page.fill("#plan-form [data-limit=requests_per_minute]", "100")
    page.fill("#plan-form [data-limit=max_keys]", "3")
    page.click("#plan-save")
    page.locator("#admin-plans tbody tr[data-plan=Team]", has_text="100 rpm, 3 keys").wait_for()
    account_row(page, "customer@example.com").locator("select.account-plan").select_option("Team")
    page.wait_for_selector("#notice.info:not([hidden])")
    page.locator("#admin-plans tbody tr[data-plan=Team] td[data-label=Accounts]", has_text="1").wait_for()
    with api_db() as db:
        assert crud.get_account_by_email(db, "customer@example.com").plan.name == "Team"

    page.locator("#admin-plans tbody tr[data-plan=Team] button.edit-plan").click()
    page.fill("#plan-form [data-limit=requests_per_minute]", "120")
    page.check("#plan-default")
    page.click("#plan-save")
    page.locator("#admin-plans tbody tr[data-plan=Team]", has_text="120 rpm, 3 keys").wait_for()
    assert page.locator("#admin-plans tbody tr[data-plan=Team] .badge", has_text="default").count() == 1

    page.select_option("#invite-plan", "Team")
    page.fill("#invite-note", "for Grace")
    page.click("#invite-form button[type=submit]")
    page.wait_for_selector("#invite-code-card:not([hidden])")
    code = page.text_content("#invite-code")
    assert code.startswith("msi-")
    assert "open" in page.locator("#admin-invites tbody tr", has_text="for Grace").text_content()
    page.click("#dismiss-invite")
    assert code not in page.content()  # shown once

    account_row(page, "customer@example.com").locator("button.toggle-account").click()
    disabled = page.locator("#admin-accounts tbody tr.disabled[data-email='customer@example.com']")
    disabled.wait_for()
    assert "unpaid invoice" in disabled.text_content()
    refused = ask(web_server.url, secret)  # the next request, from another program, over HTTP
    assert refused.status_code == 401 and "unpaid invoice" in refused.json()["error"]["message"]
    screenshot(page, "operator-laptop")

    page.set_viewport_size(PHONE)  # at phone width too, nothing overflows
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "operator-phone")


def test_a_key_the_operator_disabled_shows_its_owner_why_and_no_enable_button(open_page, web_server, api_db):
    with api_db() as db:
        crud.create_account(db, "keeper@example.com", PASSWORD, is_admin=True)
        owner = crud.create_account(db, "keyowner@example.com", PASSWORD)
        key, secret = crud.create_api_key(db, owner, "leaky")
        crud.set_key_ceiling(db, key, crud.KeyLimits(requests_per_minute=10))
        plans.create_plan(db, "Owners", PlanLimits(tokens_per_day=5000))
        plans.assign_plan(db, owner, plans.get_plan(db, "Owners"))

    page, _ = open_page()
    page.on("dialog", lambda dialog: dialog.accept(*(["posted in a public repository"]
                                                     if dialog.type == "prompt" else [])))
    log_in(page, "keeper@example.com")
    page.click("#nav a[data-page=operator]")
    account_row(page, "keyowner@example.com").locator("button.show-keys").click()
    key_row = page.locator("#admin-accounts tr.key-list tr", has_text="leaky")
    assert "ceiling: 10 rpm" in key_row.text_content()
    key_row.locator("button.toggle-key").click()
    page.locator("#admin-accounts tr.key-list tr.disabled", has_text="posted in a public repository").wait_for()
    assert ask(web_server.url, secret).status_code == 401

    owner_page, _ = open_page()
    log_in(owner_page, "keyowner@example.com")
    row = owner_page.locator("#keys-table tbody tr", has_text="leaky")
    row.wait_for()
    assert "Disabled by the operator: posted in a public repository." in row.text_content()
    assert "ceiling: 10 rpm" in row.text_content()
    assert row.locator("button.toggle-key").count() == 0
    assert not owner_page.is_visible("#nav a[data-page=operator]")
    screenshot(owner_page, "keys-disabled-by-operator-laptop")
    owner_page.click("#nav a[data-page=account]")
    assert "Owners (5000 tokens/day)" in owner_page.text_content("#account-plan")
