"""The wallet as a person uses it (issue 14, point 3), in Debian's headless Chromium (Selenium
with chromium-driver; no browser is downloaded; skipped without them, as
tests/test_browser_checkout.py is): register, log in, get a virtual card, add a bank account and
charge the card from it, then buy at the demo mall with the wallet button (embodiment 1: the
wallet takes the purchase from the mall's page, the member picks the card, the mall asks the
gateway for approval); and embodiments 2 and 3 (the wallet fills the card's details into the
mall's form; the mall asks the gateway or the VAN). Screenshots of each page go to the test's
tmp dir (paths printed). The
mall is reached as ``localhost`` and the wallet as ``127.0.0.1``: two sites, so the wallet's
cookie never goes to the mall, and the test checks every request the mall got."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from svcard.host.wallet.stack import WalletStack, start_wallet
from svcard.host.wallet.web.app import COOKIE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ACCOUNT = "1000000000000009"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    s = start_wallet(tmp_path_factory.mktemp("wallet-browser"), mall_host="localhost")
    s.open_account(ACCOUNT, "acct5678", 100_000)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"no Chromium ({CHROMIUM}) or chromedriver ({CHROMEDRIVER}): install "
                    "Debian's chromium and chromium-driver packages")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=900,1100", "--no-first-run"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check`` until it gives something true (an element missing or gone stale while
    a page loads counts as not yet); its value."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            if value := check():
                return value
        except (NoSuchElementException, StaleElementReferenceException):
            pass
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.05)


def shot(driver: Any, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 1000
    print(f"screenshot: {path}")


def by_id(driver: Any, element: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element)


def status(driver: Any, starts: str) -> str:
    """Wait for the wallet's status line to start with ``starts``; its text."""
    text = wait(f"the status {starts!r}", lambda: (t := by_id(driver, "status").text)
                .startswith(starts) and t)
    return str(text)


def settled(driver: Any) -> None:
    """Wait until the wallet page has read the wallet (its status is no longer "Loading..."):
    before that, whether the member is still logged in is not yet on the page."""
    wait("the wallet page to load", lambda: by_id(driver, "status").get_attribute(
        "data-state") != "loading")


def click(driver: Any, element: str, fields: dict[str, str] | None = None) -> None:
    for name, value in (fields or {}).items():
        box = by_id(driver, name)
        box.clear()
        box.send_keys(value)
    by_id(driver, element).click()


def test_register_issue_charge_and_pay_at_the_mall(browser: Any, stack: WalletStack,
                                                   tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    web = stack.url("web")
    browser.get(f"{web}/wallet")
    status(browser, "Register or log in.")
    shot(browser, tmp_path, "1-start")
    click(browser, "register", {"reg-member": "walker", "reg-password": "walk the walk"})
    status(browser, "Registered walker")
    click(browser, "login", {"login-member": "walker", "login-password": "walk the walk"})
    status(browser, "Logged in as walker")
    shot(browser, tmp_path, "2-logged-in")
    # a virtual card: its number and its secret, shown once
    click(browser, "issue-virtual")
    status(browser, "Card ")
    issued = by_id(browser, "issued")
    number, secret = issued.get_attribute("data-number"), issued.get_attribute("data-secret")
    assert len(number) == 16 and len(secret) == 8 and secret in issued.text
    shot(browser, tmp_path, "3-issued")
    # a bank account, then 50.00 charged from it
    click(browser, "link", {"link-number": ACCOUNT, "link-secret": "acct5678"})
    status(browser, f"Added account {ACCOUNT}")
    Select(by_id(browser, "charge-card")).select_by_value(number)
    Select(by_id(browser, "charge-source")).select_by_value(f"account:{ACCOUNT}")
    click(browser, "charge", {"charge-amount": "50.00"})
    assert status(browser, "Charged") == "Charged CNY 50.00: the balance is CNY 50.00."
    row = browser.find_element("css selector", f'tr[data-number="{number}"] .balance')
    assert row.text == "CNY 50.00"
    shot(browser, tmp_path, "4-charged")
    # the mall's payment page, its wallet button, the wallet with the purchase
    browser.get(f"{stack.url('mall')}/shop/")
    wait("the mall's total", lambda: by_id(browser, "total").text == "CNY 21.00")
    shot(browser, tmp_path, "5-mall")
    by_id(browser, "wallet-button").click()
    wait("the wallet's purchase box", lambda: by_id(browser, "purchase-box").is_displayed()
         and by_id(browser, "pay-form").is_displayed())
    assert by_id(browser, "p-amount").text == "CNY 21.00"
    assert by_id(browser, "p-mall").text == "MALL001"
    Select(by_id(browser, "pay-card")).select_by_value(number)
    by_id(browser, "pay-secret").send_keys(secret)
    shot(browser, tmp_path, "6-wallet-purchase")
    by_id(browser, "pay").click()
    # back at the mall, which asked the gateway for the approval
    result = wait("the mall's result", lambda: browser.current_url.startswith(
        stack.url("mall")) and by_id(browser, "result").get_attribute("data-state")
        in ("approved", "declined", "error") and by_id(browser, "result"))
    shot(browser, tmp_path, "7-paid")
    assert result.get_attribute("data-state") == "approved", result.text
    assert result.text.startswith("Paid CNY 21.00")
    # the balances: the card paid 21.00, the account gave 50.00
    browser.get(f"{web}/wallet")
    row = wait("the card's row", lambda: browser.find_elements(
        "css selector", f'tr[data-number="{number}"] .balance'))
    assert row[0].text == "CNY 29.00"
    shot(browser, tmp_path, "8-after")
    db = sqlite3.connect(stack.folder / "wallet-fin.db")
    assert db.execute("SELECT balance FROM wf_cards WHERE number=?", (number,)).fetchone()[0] \
        == 2_900
    assert db.execute("SELECT balance FROM wf_accounts WHERE number=?",
                      (ACCOUNT,)).fetchone()[0] == 95_000
    db.close()
    # anonymity: nothing the mall received names the member or carries the wallet's session
    seen = json.dumps(stack.mall.seen)
    assert len(stack.mall.seen) >= 4
    for leak in ("walker", "walk the walk", secret, COOKIE):
        assert leak not in seen, leak


@pytest.mark.parametrize("via", ["gateway", "van"])
def test_card_details_filled_into_the_mall_form(browser: Any, stack: WalletStack,
                                                tmp_path: Path, via: str) -> None:
    """Embodiment 2 (the mall asks the gateway) and 3 (the mall asks the VAN): the wallet
    fills the card's number, the secret the member typed and the profile token into the
    mall's form; the mall's page drops them from its address; the mall is paid once."""
    from selenium.webdriver.support.ui import Select
    from test_wallet_network import topup

    web, name = stack.url("web"), f"filler-{via}"
    browser.get(f"{web}/wallet")
    settled(browser)
    if by_id(browser, "wallet").is_displayed():
        click(browser, "logout")
        status(browser, "Logged out.")
    click(browser, "register", {"reg-member": name, "reg-password": "fill it in"})
    status(browser, f"Registered {name}")
    click(browser, "login", {"login-member": name, "login-password": "fill it in"})
    status(browser, f"Logged in as {name}")
    click(browser, "issue-virtual")
    status(browser, "Card ")
    issued = by_id(browser, "issued")
    number, secret = issued.get_attribute("data-number"), issued.get_attribute("data-secret")
    topup(stack, number, 3_000, f"cash-browser-{via}")
    browser.get(f"{stack.url('mall')}/shop/")
    # a new customer at the mall (its id there is bound to the first member who paid with it)
    browser.delete_all_cookies()
    wait("the mall's total", lambda: by_id(browser, "total").text == "CNY 21.00")
    by_id(browser, "wallet-button").click()
    wait("the wallet's purchase box", lambda: by_id(browser, "pay-form").is_displayed())
    Select(by_id(browser, "pay-card")).select_by_value(number)
    by_id(browser, "pay-secret").send_keys(secret)
    shot(browser, tmp_path, f"1-wallet-{via}")
    by_id(browser, "fill").click()
    wait("the mall's filled form", lambda: browser.current_url.startswith(stack.url("mall"))
         and by_id(browser, "card-form").is_displayed()
         and by_id(browser, "result").get_attribute("data-state") == "filled")
    assert by_id(browser, "card-number").get_attribute("value") == number
    assert by_id(browser, "card-secret").get_attribute("value") == secret
    assert len(by_id(browser, "card-profile").get_attribute("value")) == 96
    assert "#" not in browser.current_url and secret not in browser.current_url
    shot(browser, tmp_path, f"2-mall-form-{via}")
    by_id(browser, "pay-gateway" if via == "gateway" else "pay-van").click()
    result = wait("the mall's result", lambda: by_id(browser, "result").get_attribute(
        "data-state") in ("approved", "declined") and by_id(browser, "result"))
    shot(browser, tmp_path, f"3-paid-{via}")
    assert result.get_attribute("data-state") == "approved", result.text
    assert result.text.startswith("Paid CNY 21.00")
    # a second click: answered with the first outcome (the gateway: 409 with the state and
    # the approval, as the mall's own exact request; the VAN: the first outcome again), not
    # paid twice
    browser.execute_script('document.getElementById("result").dataset.state = "idle";')
    by_id(browser, "pay-gateway" if via == "gateway" else "pay-van").click()
    second = wait("the second answer", lambda: (state := by_id(browser, "result")
                  .get_attribute("data-state")) in ("approved", "declined") and state)
    assert second == "approved"
    db = sqlite3.connect(stack.folder / "wallet-fin.db")
    assert db.execute("SELECT balance FROM wf_cards WHERE number=?", (number,)).fetchone()[0] \
        == 900
    assert db.execute("SELECT count(*) FROM wf_movements WHERE card=? AND kind='debit'",
                      (number,)).fetchone()[0] == 1
    db.close()
    browser.get(f"{web}/wallet")
    row = wait("the card's row", lambda: browser.find_elements(
        "css selector", f'tr[data-number="{number}"] .balance'))
    assert row[0].text == "CNY 9.00"
    shot(browser, tmp_path, f"4-after-{via}")
    seen = json.dumps(stack.mall.seen)
    assert name not in seen and "fill it in" not in seen and COOKIE not in seen


def test_a_wrong_secret_and_a_foreign_page(browser: Any, stack: WalletStack,
                                           tmp_path: Path) -> None:
    """A wrong card secret in the wallet: refused on the page, no purchase kept, the mall's
    approval finds nothing. Then a page on another site (the mall's, localhost) tries the
    wallet's API with the member's cookie: every try is blocked or refused, no card issued."""
    from selenium.webdriver.support.ui import Select

    web = stack.url("web")
    browser.get(f"{web}/wallet")
    settled(browser)
    if by_id(browser, "auth").is_displayed():
        click(browser, "register", {"reg-member": "walker2", "reg-password": "walk the walk"})
        status(browser, "Registered walker2")
        click(browser, "login", {"login-member": "walker2", "login-password": "walk the walk"})
        status(browser, "Logged in as walker2")
    click(browser, "issue-real")
    status(browser, "Card ")
    assert "being mailed" in by_id(browser, "issued").text
    wait("the real card's row", lambda: browser.find_elements(
        "css selector", "#cards tbody tr"))
    click(browser, "issue-virtual")
    status(browser, "Card ")
    number = by_id(browser, "issued").get_attribute("data-number")
    kinds = [row.text for row in browser.find_elements("css selector", "#cards tbody tr")]
    assert any("real" in k for k in kinds) and any("virtual" in k for k in kinds), kinds
    cards_before = len(kinds)
    browser.get(f"{stack.url('mall')}/shop/")
    wait("the mall's total", lambda: by_id(browser, "total").text == "CNY 21.00")
    by_id(browser, "wallet-button").click()
    wait("the wallet's pay form", lambda: by_id(browser, "pay-form").is_displayed())
    Select(by_id(browser, "pay-card")).select_by_value(number)
    by_id(browser, "pay-secret").send_keys("00000000")
    by_id(browser, "pay").click()
    text = status(browser, "Not sent")
    shot(browser, tmp_path, "wrong-secret")
    assert "wrong card secret" in text and browser.current_url.startswith(web)
    order = json.loads(browser.execute_script(
        "return decodeURIComponent(location.hash.slice('#purchase='.length))"))["purchase"]
    order.pop("signature")                  # the mall asks with its own (unsigned) record
    import httpx

    with httpx.Client(timeout=30) as http:
        assert stack.mall_link(http).post("/v1/approvals", order)[0] == 404
    # a foreign page's tries, with the member's cookie in the browser (a plain page on
    # localhost with no Content-Security-Policy of its own, so only the wallet's guards act)
    foreign = blank_page()
    try:
        browser.get(foreign.url)
        results = run_foreign(browser, web)
    finally:
        foreign.close()
    print("foreign page:", results)
    assert results["with header"] == "blocked" and results["read wallet"] == "blocked"
    assert results["no header"] in ("opaque:0", "blocked")
    browser.get(f"{web}/wallet")
    wait("the wallet", lambda: browser.find_elements("css selector", "#cards tbody tr"))
    assert len(browser.find_elements("css selector", "#cards tbody tr")) == cards_before


class blank_page:
    """A page on http://localhost:PORT/ with no headers of its own."""

    def __init__(self) -> None:
        import http.server
        import threading

        body = b"<!doctype html><title>elsewhere</title><p>another site</p>"

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.url = f"http://localhost:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_foreign(browser: Any, web: str) -> dict[str, str]:
    results: dict[str, str] = browser.execute_async_script("""
        const done = arguments[arguments.length - 1], web = arguments[0], out = {};
        const tries = [
          ["with header", fetch(web + "/api/cards", {method: "POST", credentials: "include",
              headers: {"X-Svcard-Wallet": "1", "Content-Type": "application/json"},
              body: JSON.stringify({kind: "virtual"})})],
          ["no header", fetch(web + "/api/cards", {method: "POST", credentials: "include",
              mode: "no-cors", body: JSON.stringify({kind: "virtual"})})],
          ["read wallet", fetch(web + "/api/wallet", {credentials: "include",
              headers: {"X-Svcard-Wallet": "1"}})],
        ];
        Promise.all(tries.map(([name, p]) => p.then(r => r.type + ":" + r.status,
                                                      e => "blocked")
          .then(v => { out[name] = v; }))).then(() => done(out));
    """, web)
    return results
