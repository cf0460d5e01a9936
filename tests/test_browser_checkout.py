"""The merchant's checkout page as a person uses it (issue 10, point 7): in Debian's headless
Chromium (Selenium with chromium-driver; no browser is downloaded), the page is paired with a
local card helper once, then each variant is paid from the page and the goods shown; a card with
too little balance shows the refusal; a page from an origin the helper does not allow is refused
by the helper. Screenshots go to the test's tmp dir (their paths are printed).

The page itself (no order made by loading it, no key in it, its headers) is checked over plain
HTTP first, so that part runs without a browser too.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_helper import Helper, balance, merchant_behind_fake, start_helper

from svcard.host.demo.system import card_image
from svcard.host.helper.payments import HelperCard
from svcard.host.pay import client as C
from svcard.host.pay.stack import Stack, start_stack
from svcard.protocols import messages as M

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FINAL = ("paid", "pending", "refused", "failed", "unreachable", "unpaired", "timeout")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("checkout"), psams=2)
    yield s
    s.close()


# --- the page over plain HTTP ---------------------------------------------------------------

def test_the_page_makes_no_order_and_holds_no_key(stack: Stack, http: httpx.Client) -> None:
    before = stack.merchant_server.db.counts()
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    for _ in range(20):
        r = http.get(f"{stack.merchant.url}/v1/checkout/ticket?variant=fig5", headers=html)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert stack.merchant_server.db.counts() == before      # loading the page makes no order
    assert "CNY 12.50" in page and "Pay with card" in page and "Museum e-ticket" in page
    assert 'data-checkout-url="' + stack.merchant.url + '/v1/checkout/ticket?variant=fig5"' \
        in page
    for secret in ("tsk", "etsk", "txn_id", stack.shared_key.hex(), stack.shared_key.hex().upper()):
        assert secret not in page
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "'unsafe-inline'" not in csp and "<script>" not in page
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    # points and the free login are shown as what they are
    login = http.get(f"{stack.merchant.url}/v1/checkout/login", headers=html).text
    assert "No charge" in login and "Sign in with card" in login
    # an unknown item or a variant the shop does not take: an HTML page saying so, no order
    r = http.get(f"{stack.merchant.url}/v1/checkout/nothing", headers=html)
    assert r.status_code == 404 and "No item" in r.text and "<script>" not in r.text
    r = http.get(f"{stack.merchant.url}/v1/checkout/ticket?variant=fig9", headers=html)
    assert r.status_code == 400 and "This shop takes" in r.text
    shop = http.get(f"{stack.merchant.url}/shop/").text
    assert '<a href="/v1/checkout/ticket">Museum e-ticket</a>' in shop and "CNY 0.99" in shop
    assert stack.merchant_server.db.counts() == before
    for path, kind in (("/shop/checkout.js", "text/javascript"), ("/shop/checkout.css",
                                                                  "text/css")):
        r = http.get(stack.merchant.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    # whatever a browser's GET asks for, it gets the page (an <img> on someone else's page
    # makes no order either); HEAD too
    for accept in ("*/*", "image/avif,image/webp,*/*;q=0.8", "application/json", ""):
        r = http.get(f"{stack.merchant.url}/v1/checkout/ticket", headers={"Accept": accept})
        assert r.headers["content-type"].startswith("text/html") and "tsk" not in r.text
    assert http.head(f"{stack.merchant.url}/v1/checkout/ticket").status_code == 200
    assert stack.merchant_server.db.counts() == before
    # the command-line client's order: a POST with its header, answered with the TSK
    params = C.fetch_checkout(http, f"{stack.merchant.url}/v1/checkout/ticket")
    assert params["amount"] == 1250 and len(params["tsk"]) == 64
    assert stack.merchant_server.db.counts() == {**before, "open": before.get("open", 0) + 1}


# --- in Chromium ----------------------------------------------------------------------------

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
                     "--window-size=900,900", "--no-first-run"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")   # Chromium refuses to run as root otherwise
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shop_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return card_image(tmp_path_factory.mktemp("card"), ep=10_000)


@pytest.fixture(scope="module")
def helper(stack: Stack, shop_card: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[Helper]:
    h = start_helper(HelperCard(f"virtual:{shop_card}",
                                tmp_path_factory.mktemp("j") / "journal.jsonl",
                                terminal=stack.client_terminal), [stack.merchant.url])
    yield h
    h.close()


def status(driver: Any, timeout: float = 60.0) -> tuple[str, str]:
    """Wait for the page's status to reach a final state; (state, text)."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        element = driver.find_element(By.ID, "status")
        state = element.get_attribute("data-state")
        if state in FINAL:
            return state, element.text
        assert time.monotonic() < deadline, f"the page's status stayed {state}: {element.text}"
        time.sleep(0.05)


def shot(driver: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 1000
    print(f"screenshot: {path}")
    return path


def pair(driver: Any, helper_url: str, token: str) -> str:
    """Enter the helper's address and token in the page's "Card helper" box; its answer."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "pairing")
    if box.get_attribute("open") is None:
        box.find_element(By.TAG_NAME, "summary").click()
    for field, value in (("helper-url", helper_url), ("helper-token", token)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    state = driver.find_element(By.ID, "pairing-state")
    before = state.get_attribute("textContent")
    driver.find_element(By.ID, "pair").click()
    deadline = time.monotonic() + 30
    while (text := state.get_attribute("textContent")) == before:
        assert time.monotonic() < deadline, "the page did not answer the pairing"
        time.sleep(0.05)
    return str(text)


def pay_from_page(driver: Any, url: str) -> tuple[str, str]:
    from selenium.webdriver.common.by import By

    driver.get(url)
    driver.find_element(By.ID, "pay").click()
    return status(driver)


@pytest.mark.parametrize("variant", ["fig5", "fig6", "fig7", "fig8"])
def test_each_variant_paid_from_the_page(browser: Any, stack: Stack, helper: Helper,
                                         shop_card: Path, tmp_path: Path,
                                         variant: str) -> None:
    from selenium.webdriver.common.by import By

    page = f"{stack.merchant.url}/v1/checkout/ticket?variant={variant}"
    browser.get(page)
    if browser.execute_script("return localStorage.getItem('svcard-helper')") is None:
        shot(browser, tmp_path, "unpaired")
        assert "Paired with the card helper" in pair(browser, helper.url, helper.token)
    assert browser.find_element(By.ID, "amount").text == "CNY 12.50"
    before = balance(shop_card)
    state, text = pay_from_page(browser, page)
    shot(browser, tmp_path, f"paid-{variant}")
    assert state == "paid", text
    assert text.startswith("Paid CNY 12.50")
    assert browser.find_element(By.ID, "goods").text == "TICKET-MUSEUM-0042"
    assert browser.find_element(By.ID, "goods-box").is_displayed()
    assert balance(shop_card) == before - 1250
    txn = browser.find_element(By.ID, "receipt").text.split()[-1]
    order = stack.merchant_server.orders[bytes.fromhex(txn)]
    assert order.variant == M.VARIANTS[variant]
    assert order.state == ("released_unproven" if variant == "fig7" else "paid")
    if variant == "fig7":
        assert "proven when the card's proof reaches the payment server" in text
    # the page never held a key: nothing of the order's secrets is in the page or its storage
    source = browser.page_source + str(browser.execute_script(
        "return JSON.stringify(Object.assign({}, localStorage))"))
    assert stack.shared_key.hex() not in source and "tsk" not in source.lower()


def test_a_refusal_is_shown(browser: Any, stack: Stack, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    poor = card_image(tmp_path, "poor.json", ep=1_000)        # CNY 10.00, the ticket is 12.50
    h = start_helper(HelperCard(f"virtual:{poor}", tmp_path / "journal.jsonl"),
                     [stack.merchant.url], token="P" * 43)
    try:
        page = f"{stack.merchant.url}/v1/checkout/ticket"
        browser.get(page)
        assert "Paired with the card helper" in pair(browser, h.url, h.token)
        state, text = pay_from_page(browser, page)
        shot(browser, tmp_path, "refused")
        assert state == "refused", text
        assert "balance is too low" in text and "Nothing was paid" in text
        assert not browser.find_element(By.ID, "goods-box").is_displayed()
        assert browser.find_element(By.ID, "pay").is_enabled()      # may try again
    finally:
        h.close()
        browser.execute_script("localStorage.removeItem('svcard-helper')")
    assert balance(poor) == 1_000


def test_a_wrong_token_asks_to_pair_again(browser: Any, stack: Stack, helper: Helper,
                                          tmp_path: Path) -> None:
    browser.get(f"{stack.merchant.url}/v1/checkout/song")
    assert "refused this pairing token" in pair(browser, helper.url, "W" * 43)
    shot(browser, tmp_path, "wrong-token")
    # a stored token the helper no longer takes (say, after --new-token): pair again
    browser.execute_script("localStorage.setItem('svcard-helper', JSON.stringify("
                           "{url: arguments[0], token: arguments[1]}))", helper.url, "W" * 43)
    state, text = pay_from_page(browser, f"{stack.merchant.url}/v1/checkout/song")
    assert state == "unpaired" and "pair this page again" in text
    browser.execute_script("localStorage.removeItem('svcard-helper')")


def test_a_page_from_a_foreign_origin_is_refused_by_the_helper(
        browser: Any, stack: Stack, helper: Helper, shop_card: Path, tmp_path: Path) -> None:
    """The same page served under an origin the helper does not allow (localhost instead of
    127.0.0.1 is another origin): pairing fails, and even a page that knows the token is
    refused before anything runs."""
    foreign = f"http://localhost:{stack.merchant.port}/v1/checkout/ticket"
    orders, money, refused = (stack.merchant_server.db.counts(), balance(shop_card),
                              helper.helper.refused)
    browser.get(foreign)
    text = pair(browser, helper.url, helper.token)
    assert "does not accept payments from this shop" in text, text
    assert helper.helper.refused > refused
    browser.execute_script("localStorage.setItem('svcard-helper', JSON.stringify("
                           "{url: arguments[0], token: arguments[1]}))", helper.url,
                           helper.token)
    refused = helper.helper.refused
    state, text = pay_from_page(browser, foreign)
    shot(browser, tmp_path, "foreign-origin")
    assert state == "unreachable" and "does not accept payments from this shop" in text
    assert helper.helper.refused > refused
    assert stack.merchant_server.db.counts() == orders and balance(shop_card) == money
    browser.execute_script("localStorage.removeItem('svcard-helper')")


def test_the_status_is_live(browser: Any, stack: Stack, tmp_path: Path) -> None:
    """With a slow card (150 ms per APDU) the page shows each step the helper reports while
    it polls, before the goods."""
    slow = card_image(tmp_path, "slow.json", ep=10_000)
    h = start_helper(HelperCard(f"delayed:150:virtual:{slow}", tmp_path / "journal.jsonl"),
                     [stack.merchant.url], token="S" * 43)
    page = f"{stack.merchant.url}/v1/checkout/song"
    try:
        browser.get(page)
        assert "Paired with the card helper" in pair(browser, h.url, h.token)
        browser.get(page)
        browser.execute_script(
            "window.seen = []; const s = document.getElementById('status');"
            "new MutationObserver(() => window.seen.push(s.dataset.state + ': ' + s.textContent))"
            ".observe(s, {attributes: true, childList: true, characterData: true,"
            " subtree: true});")
        from selenium.webdriver.common.by import By

        browser.find_element(By.ID, "pay").click()
        state, text = status(browser)
        seen = [str(s) for s in browser.execute_script("return window.seen")]
        shot(browser, tmp_path, "paid-song")
    finally:
        h.close()
        browser.execute_script("localStorage.removeItem('svcard-helper')")
    assert state == "paid" and text.startswith("Paid CNY 0.99"), text
    steps = [s for s in seen if s.startswith("paying: ")]
    # the page shows the helper's steps while it polls (every 250 ms): the card's reading
    # (several slow APDUs) always spans a poll; a step as short as one request may fall
    # between two polls, so which later steps are seen is not asserted
    assert steps, seen
    assert seen.index(steps[0]) < len(seen) - 1 and seen[-1].startswith("paid: "), seen


def test_a_merchant_error_after_the_debit_shows_pending(browser: Any, tmp_path: Path) -> None:
    """The merchant fails (500) on the confirmation after the card paid: the page says the
    payment is being finished, not red, and offers no second payment."""
    from selenium.webdriver.common.by import By

    s = start_stack(tmp_path / "stack", psams=1)   # its own: its merchant gets a fake in front
    card = card_image(tmp_path, "pending.json", ep=10_000)
    try:
        with merchant_behind_fake(s) as fake:
            fake.failures = 1_000
            h = start_helper(HelperCard(f"virtual:{card}", tmp_path / "journal.jsonl"),
                             [s.merchant.url], token="Q" * 43)
            try:
                page = f"{s.merchant.url}/v1/checkout/ticket"
                browser.get(page)
                assert "Paired with the card helper" in pair(browser, h.url, h.token)
                state, text = pay_from_page(browser, page)
                shot(browser, tmp_path, "pending")
                button = browser.find_element(By.ID, "pay")
                enabled, label = button.is_enabled(), button.text
                colour = browser.find_element(By.ID, "status").value_of_css_property(
                    "background-color")
            finally:
                h.close()
                browser.execute_script("localStorage.removeItem('svcard-helper')")
    finally:
        s.close()
    assert state == "pending", text
    assert text.startswith("The card was debited; the card helper will finish this payment")
    assert "Do not pay again." in text
    assert not enabled and label == "Payment being finished"
    assert colour not in ("rgba(251, 227, 225, 1)", "rgb(251, 227, 225)"), colour  # not red
    assert balance(card) == 8_750


THIRD_PARTY_PAGE = """<!doctype html><title>waiting</title>
<iframe name="sink" id="sink"></iframe>
<form id="form" method="post" action="{url}" target="sink"><input name="variant" value="fig6">
</form>
<form id="plain" method="post" action="{url}" enctype="text/plain" target="sink2">
<input name="a" value="b"></form><iframe name="sink2" id="sink2"></iframe>
<script>
const url = "{url}";
window.results = {{}};
let pending = 0;
function track(name, promise) {{
  pending++;
  promise.then(v => {{ window.results[name] = v; }}, e => {{ window.results[name] = "blocked"; }})
    .finally(() => {{ if (--pending === 0) document.title = "done"; }});
}}
function loaded(name, element, start) {{
  track(name, new Promise(done => {{ element.onload = () => done("loaded");
                                     element.onerror = () => done("error"); start(); }}));
}}
for (let i = 0; i < 5; i++) {{
  const img = new Image();
  loaded("img" + i, img, () => {{ img.src = url + "&n=" + i; }});
}}
const script = document.createElement("script");
loaded("script", script, () => {{ script.src = url; document.body.appendChild(script); }});
loaded("form", document.getElementById("sink"),
       () => document.getElementById("form").submit());
loaded("plain", document.getElementById("sink2"),
       () => document.getElementById("plain").submit());
track("no-cors get", fetch(url, {{mode: "no-cors"}}).then(r => r.type));
track("no-cors post", fetch(url, {{mode: "no-cors", method: "POST", body: "x"}}).then(r => r.type));
track("preflighted", fetch(url, {{method: "POST", headers: {{"X-Svcard-Client": "1"}}}})
  .then(r => r.text()));
track("beacon", Promise.resolve(navigator.sendBeacon(url, "x")));
</script>"""


def test_a_third_party_page_makes_no_order(browser: Any, stack: Stack, tmp_path: Path) -> None:
    """A page on another site (localhost, not 127.0.0.1) that points images, a script, forms,
    no-cors fetches and a beacon at a checkout URL, and tries the client's header (which needs
    a preflight the merchant never grants): not one order is made, and no answer is readable."""
    import http.server
    import threading

    url = f"{stack.merchant.url}/v1/checkout/ticket?variant=fig6"
    body = THIRD_PARTY_PAGE.format(url=url).encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    before = stack.merchant_server.db.counts()
    try:
        browser.get(f"http://localhost:{server.server_address[1]}/")
        deadline = time.monotonic() + 30
        while browser.title != "done":
            assert time.monotonic() < deadline, browser.execute_script("return window.results")
            time.sleep(0.05)
        results = browser.execute_script("return window.results")
        shot(browser, tmp_path, "third-party-page")
    finally:
        server.shutdown()
        server.server_close()
    print("third-party page:", results)
    assert results["preflighted"] == "blocked", results   # the preflight is refused
    assert results["no-cors get"] == "opaque" and results["no-cors post"] == "opaque"
    assert stack.merchant_server.db.counts() == before, results
