"""Human and JSON views of a card image (balances, counters, log; never keys)."""

from __future__ import annotations

from typing import Any

from ...protocols import purse as P
from ..terminal.money import format_money
from ..terminal.purse import LogEntry


def describe_image(image: dict[str, Any]) -> dict[str, Any]:
    kind = image.get("kind")
    app = image["app"]
    out: dict[str, Any] = {"kind": kind, "atr": image.get("atr"), "aid": app.get("aid")}
    if kind == "iep":
        pub = P.PublicAppData.parse(bytes.fromhex(app["public_data"]))
        out.update({
            "issuer_id": pub.issuer_id.hex().upper(),
            "app_serial": pub.app_serial.hex().upper(),
            "start_date": pub.start_date.hex(), "expiry_date": pub.expiry_date.hex(),
            "currency_code": app["currency_code"],
            "currency_exponent": app["currency_exponent"],
            "balance_limit": app["balance_limit"],
            "ep": app["ep"], "ed": app["ed"],
            "pin_tries_left": app.get("pin_tries_left"),
            "pin_set": app.get("pin") is not None,
            "log": [LogEntry.from_record(bytes.fromhex(r)).__dict__ for r in app["log"]],
            "pending_log": app.get("pending_log") is not None,
        })
    elif kind == "psam":
        records = [P.PsamRecord.parse(bytes.fromhex(r)) for r in app["records"]]
        totals: dict[str, list[int]] = {}
        for rec in records:
            t = totals.setdefault(rec.issuer_id.hex().upper(), [0, 0])
            t[0] += 1
            t[1] += rec.amount
        out.update({
            "terminal_id": app["terminal_id"], "psam_serial": app["psam_serial"],
            "next_ttn": app["next_ttn"], "batch_number": app["batch_number"],
            "open_batch_records": len(records),
            "totals": {i: {"count": c, "amount": a} for i, (c, a) in totals.items()},
            "blocked_cards": app.get("blocked", []),
            "issuers": sorted({k["issuer_id"] for k in app["keys"]}),
        })
    elif kind == "hsm":
        out["issuers"] = [i["issuer_id"] for i in app["issuers"]]
    return out


def render_image(d: dict[str, Any]) -> str:
    lines = [f"{d['kind']} card image, AID {d['aid']}"]
    if d["kind"] == "iep":
        exp, code = d["currency_exponent"], d["currency_code"]

        def money(minor: int) -> str:
            return format_money(minor, code, exp)

        lines += [
            f"  issuer {d['issuer_id']}  serial {d['app_serial']}  "
            f"valid {d['start_date']}..{d['expiry_date']}",
            f"  currency {d['currency_code']} (exponent {exp}), balance limit "
            f"{money(d['balance_limit'])}",
        ]
        for name in ("ep", "ed"):
            p = d[name]
            lines.append(f"  {name.upper()}: balance {money(p['balance'])}  "
                         f"online counter {p['online_counter']}  "
                         f"offline counter {p['offline_counter']}")
        lines.append(f"  PIN tries left: {d['pin_tries_left']}")
        lines.append(f"  log ({len(d['log'])} records, newest first):")
        for e in d["log"]:
            lines.append(f"    {e['date']} {e['time']}  {e['type_name']:<20} "
                         f"{money(e['amount']):>14}  counter {e['counter']}  "
                         f"terminal {e['terminal_id']}")
    elif d["kind"] == "psam":
        lines += [f"  terminal {d['terminal_id']}  serial {d['psam_serial']}  "
                  f"next TTN {d['next_ttn']}  batch {d['batch_number']} "
                  f"({d['open_batch_records']} records)"]
        for issuer, t in d["totals"].items():
            lines.append(f"  issuer {issuer}: {t['count']} purchases, {t['amount']} minor units")
        lines.append(f"  blocked cards: {', '.join(d['blocked_cards']) or 'none'}")
    else:
        lines.append(f"  issuers: {', '.join(d['issuers'])}")
    return "\n".join(lines)
