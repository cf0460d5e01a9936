"""The loyalty part of ``svcard demo`` (seed 002 FIG. 16): the demo card's skymiles programme
earns points through the load flow, with the programme's server in the bank's role and a load
HSM holding only the programme's keys, then spends some on a benefit through the payment flow
(FIG. 6), with the programme's web server in the merchant's role and a points PSAM. The
programme is cleared and audited on its own, in points, never mixed with the money of the rest
of the demo. Fixtures: miles-issuer.toml (unit = "points"), miles-hsm.toml, miles-psam.toml,
miles-clearing.toml, iep-miles-demo.toml (the card with the programme)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ...card.image import save_new_image
from ...card.personalise import image_from_profile
from ...fixtures import fixture_path
from ...reader.base import Reader
from ..load.client import load
from ..load.stack import LoadStack, start_load_stack
from ..pay.client import pay
from ..pay.merchant.server import Item
from ..pay.stack import Stack, start_stack
from ..terminal.journal import Journal
from ..terminal.points import points_balance
from ..terminal.reader_specs import open_reader
from .system import ask_to_stop, servers

if TYPE_CHECKING:
    from ..settle.audit import AuditReport
    from ..settle.clearing import ClearingReport

MILES_AID = bytes.fromhex("F05356434152440401")
MILES_MERCHANT = bytes.fromhex("4D494C4553303031")   # "MILES001", as miles-clearing.toml says
MEMBER = "member-0042"
BENEFITS = (Item("lounge", "Lounge pass", 1_200, "LOUNGE-PASS-7F3A"),
            Item("upgrade", "Seat upgrade", 4_000, "UPGRADE-0C42"))
POINTS = {"currency_code": 999, "currency_exponent": 0}   # ISO 4217 XXX: whole points


def run_points(folder: Path, card: Reader, lines: list[str], http: httpx.Client,
               journal: Journal, earn: int = 2_500, benefit: str = "lounge") -> dict[str, Any]:
    """Earn ``earn`` points onto ``card``'s programme, spend them on ``benefit``, clear and
    audit the programme; its servers are stopped again before returning."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for kind in ("hsm", "psam"):
        images[kind] = folder / f"miles-{kind}.json"
        save_new_image(images[kind], image_from_profile(fixture_path(f"miles-{kind}.toml")),
                       overwrite=True)
    token = os.urandom(16).hex()
    programme = start_load_stack(folder / "load", bank_options=POINTS,
                                 hsm_readers=[open_reader(f"virtual:{images['hsm']}")])
    try:
        web = start_stack(folder / "pay", merchant_id=MILES_MERCHANT, admin_token=token,
                          psam_readers=[open_reader(f"virtual:{images['psam']}")],
                          concentration_dir=str(folder / "concentration"),
                          merchant_options={**POINTS, "catalogue": BENEFITS})
    except Exception:
        programme.close()
        raise
    try:
        secret = programme.account(MEMBER, 20_000, "miles-demo-secret")
        info, before = points_balance(card, MILES_AID)
        lines.append(
            f"LOYALTY (seed 002 FIG. 16): programme {info.label} at AID {MILES_AID.hex().upper()}"
            f" on the same card, points of issuer {info.programme} (currency 999: whole points,"
            f" never money); its server {programme.bank.url} in the bank's role (member "
            f"accounts of points) with an HSM holding only the programme's keys; its web server"
            f" {web.merchant.url} in the merchant's role with a points PSAM.")
        started = time.perf_counter()
        earned = load(programme.bank_url, card, account=MEMBER, secret=secret, amount=earn,
                      journal=journal, http=http, aid=MILES_AID)
        ms_earn = (time.perf_counter() - started) * 1000
        lines.append(
            f"POINTS EARNED through the load flow: {earned.amount} pts from member account "
            f"'{MEMBER}' (now {earned.bank['account_balance']} pts); card programme "
            f"{earned.balance_before} -> {earned.balance_after} pts; {ms_earn:.0f} ms")
        started = time.perf_counter()
        spent = pay(web.checkout_url(benefit, "fig6"), card, journal=journal, http=http,
                    aid=MILES_AID)
        ms_spend = (time.perf_counter() - started) * 1000
        lines.append(
            f"POINTS SPENT through the payment flow (FIG. 6): {spent.item} for {spent.amount} "
            f"pts; card programme {spent.balance_before} -> {spent.balance_after} pts; benefit "
            f"released on the card's confirmation: {spent.goods}; {ms_spend:.0f} ms")
        _, after = points_balance(card, MILES_AID)
        close = httpx.post(f"{web.payment.url}/v1/batches/close", timeout=60,
                           headers={"Authorization": f"Bearer {token}"})
        close.raise_for_status()
        report = _clear(folder, programme.load_server.config.db_url)
        result = _audit(folder, card, web, programme, before.count)
        f = result.figures
        lines.append(
            f"POINTS CLEARED AND AUDITED (the programme's own run, currency 999): "
            f"{report.records_cleared} redemption(s), {report.total_paid} pts settled to the "
            f"programme's web server; {report.total_loaded} pts earned moved from the member "
            f"accounts; card {f['card balances']} pts + settled {f['purchases settled']} = "
            f"opening {before.count} + earned {f['loads confirmed']}: "
            + ("clean" if result.clean else "DISCREPANCIES: " + "; ".join(
                result.discrepancies)))
        return {"programme": info.label, "aid": MILES_AID.hex().upper(),
                "issuer_id": info.programme, "points_before": before.count,
                "earned": {**earned.to_json(), "ms": round(ms_earn, 1)},
                "spent": {**spent.to_json(), "ms": round(ms_spend, 1)},
                "points_after": after.count, "clearing": report.to_json(),
                "audit": result.to_json()}
    finally:
        ask_to_stop(servers(web, programme))
        web.close()
        programme.close()


def _clear(folder: Path, load_db: object) -> ClearingReport:
    from ..settle.clearing import run_clearing
    from ..settle.config import clearing_config
    from ..settle.db import make_engine

    return run_clearing(clearing_config(fixture_path("miles-clearing.toml")),
                        folder / "concentration",
                        make_engine(f"sqlite:///{folder / 'clearing.db'}"),
                        folder / "settlement", load_db_urls=(str(load_db),))


def _audit(folder: Path, card: Reader, web: Stack, programme: LoadStack,
           opening: int) -> AuditReport:
    from ..settle.audit import audit, card_balances

    return audit(card_balances([card], MILES_AID), opening=opening, unit="points",
                 payment_dbs=(web.payment_server.config.db_url,),
                 load_dbs=(programme.load_server.config.db_url,),
                 bank_dbs=(programme.bank_server.config.db_url,),
                 clearing_db=f"sqlite:///{folder / 'clearing.db'}")
