"""The merchant's pages for people: the shop (``GET /shop/``) and the checkout page of one item
(``GET /v1/checkout/{item}`` asked by a browser, ``Accept: text/html``).

A page makes no order and holds no key: it shows the item and its price with the currency
(``CNY 12.50``) and a "Pay with card" button. The button asks the person's local card helper
(``svcard helper``, on loopback) to pay the checkout URL; the helper fetches the checkout as the
command-line client does (that is when the order is made and the TSK handed out, to the helper
only), pays with the card, and the page polls the helper for the live state until it shows the
goods or the refusal. The page is paired with the helper once: the person enters the token the
helper printed, and the page keeps it in this origin's local storage.

The script and style are served from this origin, and the Content-Security-Policy lets the page
run no other script, talk to nothing but a loopback helper, and be framed by no one (a framed
"Pay" button could be clicked by a trick).
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ...terminal.money import POINTS, currency_label, format_money

DEFAULT_HELPER = "http://127.0.0.1:8790"   # svcard helper's default address
SCRIPT_PATH = "/shop/checkout.js"
STYLE_PATH = "/shop/checkout.css"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
       "connect-src http://127.0.0.1:* http://localhost:* http://[::1]:*; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store", "Vary": "Accept"}


class Goods(Protocol):
    """An item of the catalogue, as the pages read it."""

    @property
    def sku(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def price(self) -> int: ...


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _document(title: str, body: str, status: int = 200) -> Response:
    return HTMLResponse(
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{_e(title)}</title><link rel="stylesheet" href="{STYLE_PATH}">'
        f'<script src="{SCRIPT_PATH}" defer></script></head>\n<body>{body}</body></html>\n',
        status_code=status, headers=HEADERS)


def checkout_page(item: Goods, *, currency_code: int, exponent: int, public_url: str,
                  variant: str | None) -> Response:
    """The checkout page of ``item`` (no order is made: the helper's checkout makes it)."""
    price = format_money(item.price, currency_code, exponent)
    query = f"?{urlencode({'variant': variant})}" if variant else ""
    checkout_url = f"{public_url.rstrip('/')}/v1/checkout/{quote(item.sku, safe='')}{query}"
    origin = public_url.rstrip("/")
    free = item.price == 0
    amount = "No charge: the card proves who you are" if free else price
    button = "Sign in with card" if free else "Pay with card"
    label = "pts" if currency_code == POINTS else currency_label(currency_code)
    return _document(f"{item.name}: {amount}", f"""
<main id="checkout" data-checkout-url="{_e(checkout_url)}" data-currency="{_e(label)}"
      data-origin="{_e(origin)}">
<p class="nav"><a href="/shop/">All items</a></p>
<h1 id="item">{_e(item.name)}</h1>
<p class="amount" id="amount">{_e(amount)}</p>
<button id="pay" type="button">{button}</button>
<p id="status" role="status" aria-live="polite" data-state="ready">Put your card in the
reader, then press {button}.</p>
<section id="goods-box" hidden><h2>Your purchase</h2><p id="goods"></p>
<p id="receipt" class="hint"></p></section>
<details id="pairing"><summary>Card helper</summary>
<p id="pairing-state"></p>
<p><label>Helper address <input id="helper-url" value="{_e(DEFAULT_HELPER)}"
   autocomplete="off" spellcheck="false"></label></p>
<p><label>Pairing token <input id="helper-token" type="password" autocomplete="off"
   spellcheck="false"></label>
<button id="pair" type="button">Pair</button> <button id="forget" type="button">Forget</button>
</p>
<p class="hint">The card helper runs on your computer, next to the card reader:
<code>svcard helper --card SPEC --allow-origin {_e(origin)}</code>. It prints the pairing
token when it starts.</p>
</details>
</main>
<noscript><p>Without JavaScript this page cannot reach your card helper. Pay from a terminal:
<code>svcard pay {_e(checkout_url)} --card SPEC</code></p></noscript>""")


def shop_page(items: Iterable[Goods], *, currency_code: int, exponent: int,
              merchant: str) -> Response:
    """Every item of the catalogue, each linking to its checkout page."""
    rows = "\n".join(
        f'<li><a href="/v1/checkout/{quote(i.sku, safe="")}">{_e(i.name)}</a> '
        f'<span class="amount">{_e(format_money(i.price, currency_code, exponent))}</span></li>'
        for i in items)
    return _document(f"Shop {merchant}", f'<main><h1>Shop {_e(merchant)}</h1>\n'
                                         f'<ul id="items">\n{rows}\n</ul></main>')


def error_page(status: int, reason: str) -> Response:
    return _document("Not available", f'<main><h1>Not available</h1>\n<p id="status" '
                                      f'data-state="refused">{_e(reason)}</p>\n'
                                      '<p><a href="/shop/">All items</a></p></main>', status)


async def script(request: Request) -> Response:
    return Response(SCRIPT, media_type="text/javascript; charset=utf-8",
                    headers={"X-Content-Type-Options": "nosniff",
                             "Cache-Control": "no-cache"})


async def style(request: Request) -> Response:
    return Response(STYLE, media_type="text/css; charset=utf-8",
                    headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


STYLE = """body{font-family:system-ui,sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem;
color:#1b1b1b}h1{font-size:1.6rem}.amount{font-size:1.4rem;font-weight:600}
button{font-size:1rem;padding:.5rem 1rem;cursor:pointer}button[disabled]{opacity:.5}
#status{padding:.6rem;border-radius:.3rem;background:#f1f1f1}
#status[data-state=paid]{background:#dff3e3}
#status[data-state=pending]{background:#fff4d6;border-left:.3rem solid #c98a00}
#status[data-state=refused],#status[data-state=failed],#status[data-state=unreachable],
#status[data-state=unpaired],#status[data-state=timeout]{background:#fbe3e1}
#goods{font-family:monospace;font-size:1.2rem}.hint{color:#555;font-size:.9rem}
details{margin-top:2rem}input{width:100%;box-sizing:border-box}
"""

# The page's behaviour: pairing, the payment request, and polling the helper. Every text from the
# helper is shown with textContent, never as HTML.
SCRIPT = r""""use strict";
(() => {
  const KEY = "svcard-helper";
  const $ = (id) => document.getElementById(id);
  const box = $("checkout");
  if (!box) { return; }
  const checkoutUrl = box.dataset.checkoutUrl;
  const origin = box.dataset.origin;
  const payButton = $("pay");
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function pairing() {
    try {
      const p = JSON.parse(localStorage.getItem(KEY) || "null");
      return p && typeof p.url === "string" && typeof p.token === "string" ? p : null;
    } catch (e) { return null; }
  }
  function show(state, text) {
    const s = $("status");
    s.dataset.state = state;
    s.textContent = text;
  }
  function showPairing(text) {
    const p = pairing();
    $("pairing-state").textContent = text || (p ? "Paired with the card helper at " + p.url + "."
      : "Not paired yet: enter the pairing token the card helper printed when it started.");
    if (p) { $("helper-url").value = p.url; }
    $("pairing").open = !p || Boolean(text);
  }
  function money(minor, exponent) {
    const e = Number(exponent) || 0;
    let digits = String(minor);
    if (e > 0) {
      digits = digits.padStart(e + 1, "0");
      digits = digits.slice(0, -e) + "." + digits.slice(-e);
    }
    const c = box.dataset.currency;
    return c === "pts" ? digits + " pts" : (c ? c + " " : "") + digits;
  }
  function unreachable(url) {
    return "No card helper answered at " + url + ", or it does not accept payments from this " +
      "shop. Start it with: svcard helper --card SPEC --allow-origin " + origin;
  }
  async function call(p, path, options) {
    const headers = Object.assign({"Authorization": "Bearer " + p.token}, options.headers || {});
    const response = await fetch(p.url.replace(/\/+$/, "") + path, Object.assign({}, options,
      {headers: headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer"}));
    let body = {};
    try { body = await response.json(); } catch (e) { body = {}; }
    return {status: response.status, body: body || {}};
  }
  async function pair() {
    const url = $("helper-url").value.trim();
    const token = $("helper-token").value.trim();
    if (!url || !token) {
      showPairing("Enter the helper's address and its pairing token.");
      return;
    }
    let r;
    try { r = await call({url: url, token: token}, "/v1/hello", {method: "GET"}); }
    catch (e) { showPairing(unreachable(url)); return; }
    if (r.status === 200) {
      localStorage.setItem(KEY, JSON.stringify({url: url, token: token}));
      $("helper-token").value = "";
      showPairing();
      show("ready", "Paired with the card helper. Press the button to pay.");
    } else if (r.status === 401) {
      showPairing("The card helper refused this pairing token.");
    } else {
      showPairing(r.body.reason || "The card helper answered " + r.status + ".");
    }
  }
  function forget() {
    localStorage.removeItem(KEY);
    showPairing();
  }
  function paid(job) {
    const text = Number(job.amount) === 0 ? "Card authenticated"
      : "Paid " + money(job.amount, job.currency_exponent);
    show("paid", text + (job.proven === false
      ? " (released now; proven when the card's proof reaches the payment server)." : "."));
    $("goods").textContent = String(job.goods);
    $("receipt").textContent = "Transaction " + String(job.txn_id);
    $("goods-box").hidden = false;
  }
  async function run(p) {
    show("starting", "Asking the card helper to pay...");
    let r;
    try {
      r = await call(p, "/v1/pay", {method: "POST", headers: {"Content-Type": "application/json"},
                                    body: JSON.stringify({checkout_url: checkoutUrl})});
    } catch (e) { show("unreachable", unreachable(p.url)); return false; }
    if (r.status === 401) {
      localStorage.removeItem(KEY);
      showPairing("The card helper refused the pairing token: pair this page again.");
      show("unpaired", "The card helper refused the pairing token: pair this page again.");
      return false;
    }
    if (r.status !== 202) {
      show("refused", r.body.reason || "The card helper answered " + r.status + ".");
      return false;
    }
    const id = String(r.body.id);
    const deadline = Date.now() + 180000;
    let misses = 0;
    show(r.body.state, r.body.message);
    while (Date.now() < deadline) {
      await sleep(250);
      let j;
      try { j = await call(p, "/v1/pay/" + encodeURIComponent(id), {method: "GET"}); }
      catch (e) {
        misses += 1;
        if (misses > 20) {
          show("unreachable", "Lost contact with the card helper. If the card was debited, " +
               "the helper's journal finishes the payment at its next payment.");
          return false;
        }
        continue;
      }
      misses = 0;
      if (j.status !== 200) {
        show("failed", j.body.reason || "The card helper answered " + j.status + ".");
        return false;
      }
      const job = j.body;
      if (job.state === "paid") { paid(job); return true; }
      show(String(job.state), String(job.message));
      if (job.state === "pending") {   // the card was debited: never offer to pay again
        payButton.textContent = "Payment being finished";
        return true;
      }
      if (job.state === "refused" || job.state === "failed") { return false; }
    }
    show("timeout", "No result from the card helper within 3 minutes. If the card was " +
         "debited, the helper's journal finishes the payment.");
    return false;
  }
  async function pay() {
    const p = pairing();
    if (!p) {
      show("unpaired", "Pair this page with your card helper first (below).");
      showPairing();
      return;
    }
    payButton.disabled = true;
    let done = false;
    try { done = await run(p); } finally { payButton.disabled = done; }
  }
  payButton.addEventListener("click", pay);
  $("pair").addEventListener("click", pair);
  $("forget").addEventListener("click", forget);
  showPairing();
})();
"""
