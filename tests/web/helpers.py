"""What several browser tests do on the page: set a parameter, ask, wait for an answer's numbers,
run Compare, sign up."""

ANSWER = "#conversation li:last-child .message.assistant"


def set_param(page, name: str, value, root: str = "#params") -> None:
    control = page.locator(f"{root} [data-param={name}]")
    if not control.is_visible():
        page.locator(f"{root} details.more > summary").click()
    field = control.locator("input.value, textarea, input:not([type=range])").first
    field.fill(str(value))
    field.blur()


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Control+Enter")


def answer_stats(page, timeout: float = 60_000) -> str:
    page.wait_for_function("s => document.querySelector(s + ' .stats')?.textContent.length > 0",
                           arg=ANSWER, timeout=timeout)
    return page.locator(f"{ANSWER} .stats").text_content()


def run_compare(page, web_server, first: dict, second: dict) -> list[dict]:
    """Give the two Compare panes these parameters (each with a max_tokens) and run them on one
    prompt; each pane must show exactly its max_tokens. The bodies sent, fewest max_tokens first."""
    panes = (("0", first), ("1", second))
    for pane, params in panes:
        for name, value in params.items():
            set_param(page, name, value, root=f"[data-pane='{pane}']")
    num_before = len(web_server.chat_bodies)
    page.fill("#compare-prompt", "Which is better?")
    page.press("#compare-prompt", "Control+Enter")
    for pane, params in panes:
        page.wait_for_function("s => /finish/.test(document.querySelector(s)?.textContent)",
                               arg=f"[data-pane='{pane}'] .stats", timeout=60_000)
        stats = page.locator(f"[data-pane='{pane}'] .stats").text_content()
        assert stats.startswith(f"{params['max_tokens']} tokens")
    return sorted(web_server.chat_bodies[num_before:], key=lambda body: body["max_tokens"])


PASSWORD = "correct horse battery staple"


def sign_up(page, email: str) -> None:
    _enter(page, email, "#signup")


def log_in(page, email: str) -> None:
    _enter(page, email, "#login")


def _enter(page, email: str, button: str) -> None:
    """The account page's form, sent with `button`; on the keys page once it is done."""
    page.click("#nav a[data-page=account]")
    page.fill("#auth-email", email)
    page.fill("#auth-password", PASSWORD)
    page.click(button)
    page.wait_for_selector("#page-keys:not([hidden])")
