"""A real card in the wallet, as a person uses it, in Debian's headless Chromium (Selenium with
chromium-driver; skipped without them): register, get a real card (the financial system
"mails" its image and letter), pair the page with the local card helper (``svcard helper``
holding that card), add a bank account and charge the card from it (the page has the helper
run seed 002's load flow, the gateway in the bank's role: the purse really holds the value),
then buy at the demo mall with the wallet button (embodiment 1: the page has the helper pay
the purchase by the card's own purse, then the mall asks the gateway, which approves only on
that purse payment), then again with the card's details filled into the mall's form
(embodiment 2: the page has the helper pay the purchase by the purse first, then fills the
form; the gateway approves the mall's card payment only on that purse payment, and fin's copy
is debited once). Screenshots of each page go to the test's tmp dir."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_wallet_browser import browser, by_id, click, shot, status, wait  # noqa: F401

from svcard.host.helper.app import CardHelper
from svcard.host.helper.payments import HelperCard
from svcard.host.kit.serving import ServerThread
from svcard.host.load.stack import DEMO_BANK_ID, DEMO_LOAD_TERMINAL, start_load_stack
from svcard.host.pay.server.app import MerchantAccount
from svcard.host.pay.stack import start_stack
from svcard.host.wallet.stack import MALL, WalletStack, start_wallet
from svcard.host.wallet.web.app import COOKIE
from svcard.protocols import messages as M

ACCOUNT = "1000000000000031"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    folder = tmp_path_factory.mktemp("wallet-browser-real")
    pay = start_stack(folder / "pay", psams=1)
    key = os.urandom(32)
    pay.payment_server.config.merchants[b"MALLPAY3"] = MerchantAccount(
        b"MALLPAY3", key, frozenset({M.FIG6_SERVER_COMPARES}))
    load = start_load_stack(folder / "load")
    s = start_wallet(folder / "wallet", mall_host="localhost", purse={
        "payment_url": pay.payment.url,
        "payment_terminal": pay.payment_server.pool.terminal_id,
        "merchants": {MALL: (b"MALLPAY3", key)}, "load_url": load.load.url,
        "load_terminal": DEMO_LOAD_TERMINAL, "bank_id": DEMO_BANK_ID,
        "bank_key": load.shared_key})
    s.open_account(ACCOUNT, "acct3131", 100_000)
    yield s
    s.close()
    load.close()
    pay.close()


def purse(image: Path) -> int:
    return int(json.loads(image.read_text())["app"]["ep"]["balance"])


def test_a_real_card_charged_and_paying_through_the_helper(browser: Any,  # noqa: F811
                                                           stack: WalletStack,
                                                           tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    web = stack.url("web")
    browser.get(f"{web}/wallet")
    status(browser, "Register or log in.")
    click(browser, "register", {"reg-member": "chipper", "reg-password": "chip and pin"})
    status(browser, "Registered chipper")
    click(browser, "login", {"login-member": "chipper", "login-password": "chip and pin"})
    status(browser, "Logged in as chipper")
    click(browser, "issue-real")
    status(browser, "Card ")
    number = by_id(browser, "issued").get_attribute("data-number")
    shot(browser, tmp_path, "1-real-card-issued")
    mail = stack.folder / "mail"
    image = mail / f"{number}.json"
    secret = (mail / f"{number}.letter.txt").read_text().split("secret: ")[1].strip()
    assert purse(image) == 0
    # the card goes into the reader of the card helper, which answers this wallet's pages only
    token = secrets.token_urlsafe(24)
    helper = CardHelper(HelperCard(f"virtual:{image}", tmp_path / "journal.jsonl"), token,
                        [web])
    thread = ServerThread(helper.app()).start()
    try:
        click(browser, "pair", {"helper-url": thread.url, "helper-token": token})
        status(browser, "Paired with the card helper.")
        click(browser, "link", {"link-number": ACCOUNT, "link-secret": "acct3131"})
        status(browser, f"Added account {ACCOUNT}")
        Select(by_id(browser, "charge-card")).select_by_value(number)
        Select(by_id(browser, "charge-source")).select_by_value(f"account:{ACCOUNT}")
        click(browser, "charge", {"charge-amount": "50.00"})
        assert status(browser, "Loaded") == "Loaded CNY 50.00 onto the card."
        assert purse(image) == 5_000
        row = browser.find_element("css selector", f'tr[data-number="{number}"] .balance')
        assert row.text == "CNY 50.00"
        assert browser.find_elements("css selector", "#loads li") == []
        shot(browser, tmp_path, "2-loaded")
        # the mall, its wallet button, the real card chosen: the helper pays by its purse
        browser.get(f"{stack.url('mall')}/shop/")
        wait("the mall's total", lambda: by_id(browser, "total").text == "CNY 21.00")
        by_id(browser, "wallet-button").click()
        wait("the wallet's purchase box", lambda: by_id(browser, "pay-form").is_displayed())
        Select(by_id(browser, "pay-card")).select_by_value(number)
        by_id(browser, "pay-secret").send_keys(secret)
        shot(browser, tmp_path, "3-wallet-purchase")
        by_id(browser, "pay").click()
        result = wait("the mall's result", lambda: browser.current_url.startswith(
            stack.url("mall")) and by_id(browser, "result").get_attribute("data-state")
            in ("approved", "declined", "error") and by_id(browser, "result"), timeout=90)
        shot(browser, tmp_path, "4-paid")
        assert result.get_attribute("data-state") == "approved", result.text
        assert purse(image) == 2_900
        browser.get(f"{web}/wallet")
        row = wait("the card's row", lambda: browser.find_elements(
            "css selector", f'tr[data-number="{number}"] .balance'))
        assert row[0].text == "CNY 29.00"
        shot(browser, tmp_path, "5-after")
        # anonymity: nothing the mall received names the member or carries the session
        seen = json.dumps(stack.mall.seen)
        for leak in ("chipper", "chip and pin", secret, COOKIE, token):
            assert leak not in seen, leak
        # embodiment 2: the wallet fills the real card's details once its purse has paid
        browser.get(f"{stack.url('mall')}/shop/")
        wait("the mall's total", lambda: by_id(browser, "total").text == "CNY 21.00")
        by_id(browser, "wallet-button").click()
        wait("the wallet's purchase box", lambda: by_id(browser, "pay-form").is_displayed())
        Select(by_id(browser, "pay-card")).select_by_value(number)
        by_id(browser, "pay-secret").send_keys(secret)
        by_id(browser, "fill").click()
        wait("the mall's filled form", lambda: browser.current_url.startswith(
            stack.url("mall")) and by_id(browser, "card-form").is_displayed()
            and by_id(browser, "result").get_attribute("data-state") == "filled", timeout=90)
        assert purse(image) == 800   # the purse paid before the form was filled
        assert by_id(browser, "card-number").get_attribute("value") == number
        shot(browser, tmp_path, "6-mall-form-real")
        by_id(browser, "pay-gateway").click()
        result = wait("the mall's result", lambda: by_id(browser, "result").get_attribute(
            "data-state") in ("approved", "declined", "error") and by_id(browser, "result"))
        shot(browser, tmp_path, "7-paid-filled-real")
        assert result.get_attribute("data-state") == "approved", result.text
        browser.get(f"{web}/wallet")
        row = wait("the card's row", lambda: browser.find_elements(
            "css selector", f'tr[data-number="{number}"] .balance'))
        assert row[0].text == "CNY 8.00" and purse(image) == 800
        # embodiment 2 gives the mall the card's number and secret (its form), never the member
        seen = json.dumps(stack.mall.seen)
        for leak in ("chipper", "chip and pin", COOKIE, token):
            assert leak not in seen, leak
        # a page from another origin calling the helper: refused, and nothing ran
        refused = helper.refused
        browser.get(f"{stack.url('mall')}/shop/")
        browser.execute_script(
            "fetch(arguments[0] + '/v1/hello', {headers: {Authorization: 'Bearer ' + "
            "arguments[1]}}).catch(() => null);", thread.url, token)
        wait("the helper's refusal", lambda: helper.refused > refused)
    finally:
        thread.stop()
