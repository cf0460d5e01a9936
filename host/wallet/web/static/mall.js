// The demo mall's payment page: the wallet button sends the purchase information to the
// wallet page (in the URL fragment); back from the wallet, the page asks the mall's server
// to get the payment approved by the gateway.
"use strict";

function $(id) { return document.getElementById(id); }

function money(minor) {
  const digits = String(minor).padStart(3, "0");
  return `CNY ${digits.slice(0, -2)}.${digits.slice(-2)}`;
}

async function post(path, body) {
  const r = await fetch(path, {method: "POST", credentials: "same-origin",
                               headers: {"Content-Type": "application/json", "X-Mall": "1"},
                               body: JSON.stringify(body)});
  let data = {};
  try { data = await r.json(); } catch (e) { data = {reason: r.statusText}; }
  return {status: r.status, data};
}

function show(state, text) {
  const result = $("result");
  result.dataset.state = state;
  result.textContent = text;
}

async function buy() {
  const r = await post("/shop/orders", {cart: [["tea", 2], ["cup", 1]]});
  if (r.status !== 200) { show("error", r.data.reason); return; }
  const handoff = encodeURIComponent(JSON.stringify({purchase: r.data.purchase,
                                                     return_url: r.data.return_url}));
  window.location.assign(`${r.data.wallet_url}#purchase=${handoff}`);
}

async function finish(order) {
  show("paying", `Asking the payment gateway to approve order ${order}...`);
  const r = await post(`/shop/orders/${encodeURIComponent(order)}/pay`, {});
  if (r.data.approved) show("approved", `Paid ${money(r.data.amount)}: order ${order} approved (${r.data.approval}).`);
  else show("declined", `Order ${order} was not paid: ${r.data.reason}`);
}

function filledDetails() {
  // the wallet's fill (embodiments 2 and 3): #card=<JSON {card, secret, profile}>; taken out
  // of the address at once so the secret stays in no history entry
  const hash = window.location.hash;
  if (!hash.startsWith("#card=")) return null;
  history.replaceState(null, "", window.location.pathname + window.location.search);
  try {
    const value = JSON.parse(decodeURIComponent(hash.slice("#card=".length)));
    if (value && typeof value.card === "string" && typeof value.secret === "string" &&
        typeof value.profile === "string") return value;
  } catch (e) { /* not ours */ }
  return null;
}

async function payCard(order, via) {
  show("paying", `Asking for the approval of order ${order}...`);
  const r = await post(`/shop/orders/${encodeURIComponent(order)}/pay-card`, {
    card: $("card-number").value, secret: $("card-secret").value,
    profile: $("card-profile").value, via});
  if (r.data.approved) show("approved", `Paid ${money(r.data.amount)}: order ${order} approved (${r.data.approval}).`);
  else show("declined", `Order ${order} was not paid: ${r.data.reason}`);
}

document.addEventListener("DOMContentLoaded", async () => {
  const r = await fetch("/shop/catalogue");
  const catalogue = await r.json();
  const body = $("products").tBodies[0];
  for (const item of catalogue.items) {
    const tr = document.createElement("tr");
    for (const text of [item.name, `${item.qty} x ${money(item.price)}`]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  $("total").textContent = money(catalogue.total);
  $("wallet-button").addEventListener("click", buy);
  const order = new URLSearchParams(window.location.search).get("order");
  const details = filledDetails();
  if (order && details) {
    $("card-number").value = details.card;
    $("card-secret").value = details.secret;
    $("card-profile").value = details.profile;
    $("card-form").hidden = false;
    $("pay-gateway").addEventListener("click", () => payCard(order, "gateway"));
    $("pay-van").addEventListener("click", () => payCard(order, "van"));
    show("filled", `Card details for order ${order} filled in by your wallet.`);
  } else if (order) await finish(order);
});
