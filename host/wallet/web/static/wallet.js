// The svcard wallet page (seed 003's "electronic wallet driving program"). It talks only to
// its own web server (same origin, the session cookie, the X-Svcard-Wallet header). A mall's
// page hands it the purchase information in the URL's fragment (never sent to any server):
// #purchase=<JSON {purchase, return_url}>.
"use strict";

// ISO 4217 numeric code: [letters, exponent]. A code not here is shown in minor units.
const CURRENCIES = {156: ["CNY", 2], 978: ["EUR", 2], 840: ["USD", 2], 826: ["GBP", 2],
                    344: ["HKD", 2], 392: ["JPY", 0], 410: ["KRW", 0], 48: ["BHD", 3],
                    414: ["KWD", 3], 512: ["OMR", 3], 788: ["TND", 3]};
let incoming = null;     // {purchase, return_url} from the mall's page
let member = null;
let cardCurrency = {};   // card number -> its currency, from the wallet's listing
let chargeRef = null;    // the charge being sent: the same ref again until an answer comes

function $(id) { return document.getElementById(id); }

function money(minor, currency) {
  const known = CURRENCIES[currency];
  if (!known) return `${minor} minor units of currency ${currency}`;
  const [code, exp] = known;
  const sign = minor < 0 ? "-" : "";
  const digits = String(Math.abs(minor)).padStart(exp + 1, "0");
  if (exp === 0) return `${code} ${sign}${digits}`;
  return `${code} ${sign}${digits.slice(0, -exp)}.${digits.slice(-exp)}`;
}

function minorUnits(text, currency) {
  // "12.34" in the currency's own exponent (at most that many decimals), else null
  const known = CURRENCIES[currency];
  if (!known) return null;
  const exp = known[1];
  const m = /^\s*(\d{1,10})(?:\.(\d+))?\s*$/.exec(text);
  if (!m || (m[2] !== undefined && (exp === 0 || m[2].length > exp))) return null;
  return Number(m[1]) * 10 ** exp + Number((m[2] || "").padEnd(exp, "0") || "0");
}

function say(state, text) {
  const s = $("status");
  s.dataset.state = state;
  s.textContent = text;
}

async function api(method, path, body) {
  const options = {method, credentials: "same-origin", headers: {"X-Svcard-Wallet": "1"}};
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    return {status: 0, data: {reason: "the wallet server could not be reached"}};
  }
  let data = {};
  try { data = await response.json(); } catch (e) { data = {reason: response.statusText}; }
  return {status: response.status, data};
}

// --- the local card helper (svcard helper): a real card is loaded and pays through it ---------
function helper() {
  return {url: ($("helper-url").value || "").replace(/\/+$/, ""), token: $("helper-token").value};
}

async function helperCall(method, path, body) {
  const h = helper();
  const options = {method, headers: {"Authorization": `Bearer ${h.token}`}};
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  try {
    const response = await fetch(h.url + path, options);
    let data = {};
    try { data = await response.json(); } catch (e) { data = {reason: response.statusText}; }
    return {status: response.status, data};
  } catch (e) {
    return {status: 0, data: {reason: "the card helper could not be reached (is svcard helper running?)"}};
  }
}

async function helperJob(path, body) {
  // start a job at the helper and poll it to its end (at most two minutes)
  const started = await helperCall("POST", path, body);
  if (started.status !== 202) return {state: "refused", message: started.data.reason};
  const deadline = Date.now() + 120000;
  while (Date.now() < deadline) {
    const r = await helperCall("GET", started.data.poll);
    if (r.status !== 200) return {state: "failed", message: r.data.reason};
    say("busy", `Card helper: ${r.data.message}`);
    if (["paid", "pending", "refused", "failed", "loaded"].includes(r.data.state)) return r.data;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  return {state: "failed", message: "the card helper did not finish in time"};
}

async function pair() {
  sessionStorage.setItem("svcard-helper", JSON.stringify(helper()));
  const r = await helperCall("GET", "/v1/hello");
  if (r.status === 200) say("done", "Paired with the card helper.");
  else say("error", `Not paired: ${r.data.reason}`);
}

async function loadCard(order) {
  say("busy", "Loading the real card through the card helper...");
  const view = await helperJob("/v1/load", {bank_url: `${window.location.origin}/purse/bank`,
                                            account: order.account, secret: order.secret,
                                            amount: order.amount});
  await refresh();
  if (view.state === "loaded") say("done", `Loaded ${money(view.amount, order.currency || 156)} onto the card.`);
  else say("error", `Not loaded: ${view.message}`);
}

function readFragment() {
  const hash = window.location.hash;
  if (!hash.startsWith("#purchase=")) return null;
  try {
    const value = JSON.parse(decodeURIComponent(hash.slice("#purchase=".length)));
    if (value && typeof value === "object" && value.purchase && value.return_url) return value;
  } catch (e) { /* not ours */ }
  return null;
}

function showPurchase() {
  if (!incoming) return;
  const p = incoming.purchase;
  $("purchase-box").hidden = false;
  $("p-mall").textContent = p.mall;
  $("p-order").textContent = p.order;
  $("p-amount").textContent = money(p.amount, p.currency);
  const list = $("p-products");
  list.replaceChildren();
  for (const line of p.products || []) {
    const li = document.createElement("li");
    li.textContent = `${line.qty} x ${line.sku} at ${money(line.price, p.currency)}`;
    list.appendChild(li);
  }
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  select.appendChild(o);
}

async function refresh() {
  const r = await api("GET", "/api/wallet");
  if (r.status === 401) {
    member = null;
    $("auth").hidden = false;
    $("wallet").hidden = true;
    $("pay-form").hidden = true;
    return false;
  }
  if (r.status !== 200) { say("error", r.data.reason || "the wallet could not be read"); return false; }
  $("auth").hidden = true;
  $("wallet").hidden = false;
  $("member-name").textContent = member || "";
  const body = $("cards").tBodies[0];
  body.replaceChildren();
  for (const select of [$("charge-card"), $("pay-card")]) select.replaceChildren();
  cardCurrency = {};
  for (const card of r.data.cards) {
    cardCurrency[card.number] = card.currency;
    const tr = document.createElement("tr");
    tr.dataset.number = card.number;
    for (const text of [card.number, card.kind, money(card.balance, card.currency)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    tr.lastChild.className = "balance";
    body.appendChild(tr);
    option($("charge-card"), card.number, `${card.number} (${card.kind})`);
    option($("pay-card"), card.number, `${card.number} (${card.kind}) - ${money(card.balance, card.currency)}`);
  }
  const sources = $("sources");
  sources.replaceChildren();
  $("charge-source").replaceChildren();
  for (const [kind, label, numbers] of [["account", "Bank account", r.data.accounts],
                                         ["credit", "Credit card", r.data.credit_cards]]) {
    for (const number of numbers) {
      const li = document.createElement("li");
      li.textContent = `${label} ${number}`;
      sources.appendChild(li);
      option($("charge-source"), `${kind}:${number}`, `${label} ${number}`);
    }
  }
  const loads = $("loads");
  loads.replaceChildren();
  for (const order of r.data.loads || []) {
    const li = document.createElement("li");
    li.dataset.account = order.account;
    li.textContent = `${money(order.amount, order.currency)} for card ${order.card} (${order.state}) `;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Load onto the card";
    button.className = "load";
    button.addEventListener("click", () => loadCard(order));
    li.appendChild(button);
    loads.appendChild(li);
  }
  $("pay-form").hidden = !incoming;
  return true;
}

async function register() {
  const r = await api("POST", "/api/register", {member: $("reg-member").value,
                                                 password: $("reg-password").value});
  if (r.status === 201) say("done", `Registered ${r.data.member}: log in now.`);
  else say("error", `Not registered: ${r.data.reason}`);
}

async function login() {
  const r = await api("POST", "/api/login", {member: $("login-member").value,
                                              password: $("login-password").value});
  if (r.status !== 200) { say("error", `Not logged in: ${r.data.reason}`); return; }
  member = r.data.member;
  sessionStorage.setItem("svcard-wallet-member", member);
  if (await refresh()) say("done", `Logged in as ${member}.`);
}

async function logout() {
  await api("POST", "/api/logout", {});
  sessionStorage.removeItem("svcard-wallet-member");
  member = null;
  await refresh();
  say("done", "Logged out.");
}

async function issue(kind) {
  say("busy", "Applying for a card...");
  const r = await api("POST", "/api/cards", {kind});
  if (r.status !== 200) { say("error", `No card: ${r.data.reason}`); return; }
  const issued = $("issued");
  issued.hidden = false;
  issued.dataset.number = r.data.number;
  if (kind === "virtual") {
    issued.dataset.secret = r.data.secret;
    issued.textContent = `Virtual card ${r.data.number}, secret ${r.data.secret}: note the secret, it is shown only now.`;
  } else {
    issued.dataset.secret = "";
    issued.textContent = `Real card ${r.data.number}: it is being mailed to you with its secret.`;
  }
  await refresh();
  say("done", `Card ${r.data.number} issued.`);
}

async function link() {
  const r = await api("POST", "/api/links", {kind: $("link-kind").value,
                                              number: $("link-number").value,
                                              secret: $("link-secret").value});
  if (r.status !== 200) { say("error", `Not added: ${r.data.reason}`); return; }
  await refresh();
  say("done", `Added ${r.data.kind} ${r.data.number}.`);
}

async function charge() {
  const currency = cardCurrency[$("charge-card").value];
  const amount = minorUnits($("charge-amount").value, currency);
  if (!amount) { say("error", "Amount: not an amount in this card's currency (like 10.00)"); return; }
  const [kind, source] = $("charge-source").value.split(":");
  say("busy", "Charging...");
  if (!chargeRef) {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    chargeRef = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }
  const r = await api("POST", "/api/charges", {card: $("charge-card").value, kind, source,
                                                amount, currency, ref: chargeRef});
  if (r.status !== 0 && r.status < 500) chargeRef = null;   // answered: the next is new
  if (r.status !== 200) { say("error", `Not charged: ${r.data.reason}`); await refresh(); return; }
  await refresh();
  if (r.data.load) { await loadCard({...r.data.load, currency}); return; }
  say("done", `Charged ${money(amount, currency)}: the balance is ${money(r.data.balance, currency)}.`);
}

async function pay() {
  say("busy", "Sending your choice to the payment gateway...");
  const r = await api("POST", "/api/purchases", {card: $("pay-card").value,
                                                  secret: $("pay-secret").value,
                                                  purchase: incoming.purchase,
                                                  return_url: incoming.return_url});
  if (r.status !== 200) { say("error", `Not sent: ${r.data.reason}`); return; }
  if (r.data.checkout) {
    // a real card: its purse pays first, through the card helper (seed 002's payment)
    say("busy", "The real card pays through the card helper...");
    const view = await helperJob("/v1/pay", {checkout_url: `${window.location.origin}/purse/checkout/${r.data.checkout}`,
                                             card_serial: `0000${$("pay-card").value}`});
    if (view.state !== "paid") { say("error", `The card did not pay: ${view.message}`); return; }
  }
  say("paid", "Card chosen: back to the mall, which asks for the approval.");
  window.location.assign(r.data.return_url);
}

async function fill() {
  // embodiments 2 and 3: the card's number and a one-time profile token from the gateway,
  // with the secret the member typed, written into the mall's form (in the URL fragment of
  // the mall's page, which no server sees)
  const secret = $("pay-secret").value;
  if (!/^[0-9A-Za-z]{4,64}$/.test(secret)) { say("error", "Type the card's secret first."); return; }
  say("busy", "Asking the payment gateway for the card's details...");
  const r = await api("POST", "/api/fills", {card: $("pay-card").value,
                                              purchase: incoming.purchase,
                                              return_url: incoming.return_url});
  if (r.status !== 200) { say("error", `Not filled: ${r.data.reason}`); return; }
  if (r.data.checkout) {
    // a real card: its purse pays this purchase first (the card helper); the mall's payment
    // request is approved only once it has
    say("busy", "The real card pays through the card helper...");
    const view = await helperJob("/v1/pay", {checkout_url: `${window.location.origin}/purse/checkout/${r.data.checkout}`,
                                             card_serial: `0000${$("pay-card").value}`});
    if (view.state !== "paid") { say("error", `The card did not pay: ${view.message}`); return; }
  }
  say("paid", "Card details filled: back to the mall's form.");
  const details = encodeURIComponent(JSON.stringify({card: r.data.card, secret,
                                                     profile: r.data.profile}));
  window.location.assign(`${r.data.return_url}#card=${details}`);
}

document.addEventListener("DOMContentLoaded", async () => {
  incoming = readFragment();
  member = sessionStorage.getItem("svcard-wallet-member");
  showPurchase();
  $("register").addEventListener("click", register);
  $("login").addEventListener("click", login);
  $("logout").addEventListener("click", logout);
  $("issue-virtual").addEventListener("click", () => issue("virtual"));
  $("issue-real").addEventListener("click", () => issue("real"));
  $("link").addEventListener("click", link);
  $("charge").addEventListener("click", charge);
  $("pay").addEventListener("click", pay);
  $("fill").addEventListener("click", fill);
  $("pair").addEventListener("click", pair);
  try {
    const kept = JSON.parse(sessionStorage.getItem("svcard-helper") || "null");
    if (kept) { $("helper-url").value = kept.url; $("helper-token").value = kept.token; }
  } catch (e) { /* none kept */ }
  const inside = await refresh();
  say("ready", inside ? "Your wallet." : "Register or log in.");
});
