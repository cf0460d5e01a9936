"""The SP server on loopback, for the tests, the demo and the benchmarks.

It needs the merchant's checkout URL and, for the purse pool, the provider's bank (the load
flow's bank URL, an account and its secret): the caller starts those (``host/demo/system.py``
or the tests' fixtures) and passes their addresses in, since a system imports no other system's
servers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ...card.image import save_new_image
from ...card.personalise import image_from_profile
from ...fixtures import fixture_path
from ..kit.serving import ServerThread
from .billing import DAY_MS
from .config import BillingEntry, ItemEntry, MerchantEntry, SpConfig, items_of
from .customers import add_customer
from .purses.pool import PursePoolConfig
from .server.app import SpServer
from .server.payment import Payer
from .signing import new_key, signed_order

DEMO_MERCHANT = "MERCH001"
# the demo merchant's catalogue (pay/merchant/server.py) at the SP's retail prices: the song
# costs the SP 0.99 and is sold for 1.20; the ticket is sold at the merchant's price
DEMO_ITEMS = (("song", "One song (MP3)", 120), ("ticket", "Museum e-ticket", 1250),
              ("article", "News article", 30))
__all__ = ["DAY_MS", "DEMO_MERCHANT", "SpStack", "demo_config", "demo_merchant", "purse_images",
           "start_sp"]


def purse_images(folder: Path, count: int, ep: int = 100_000, first_serial: int = 9_000_001,
                 ) -> list[Path]:
    """``count`` demo purse cards for the SP's pool, each with its own application serial
    (and so its own diversified keys) and ``ep``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = image_from_profile(fixture_path("iep-demo.toml"),
                                   app_serial=f"{first_serial + i:020d}")
        image["app"]["ep"]["balance"] = ep
        path = folder / f"sp-purse{i + 1}.json"
        save_new_image(path, image, overwrite=True)
        paths.append(path)
    return paths


def demo_merchant(name: str, merchant_url: str, *, fee: int = 5, pass_on_percent: int = 50,
                  wholesale: dict[str, int] | None = None,
                  variant: str | None = None) -> MerchantEntry:
    """The SP's catalogue entry for a merchant server at ``merchant_url`` selling the demo
    items (:data:`DEMO_ITEMS`); ``variant``: the SP's preference (the merchant decides)."""
    return MerchantEntry(
        name=name, checkout_url=f"{merchant_url.rstrip('/')}/v1/checkout", fee=fee,
        pass_on_percent=pass_on_percent, variant=variant,
        item=[ItemEntry(sku=s, name=n, retail=p, wholesale=(wholesale or {}).get(s))
              for s, n, p in DEMO_ITEMS])


def demo_config(folder: Path, merchant_url: str, *, db_url: str | None = None,
                purses: PursePoolConfig | None = None, fee: int = 5,
                pass_on_percent: int = 50, billing: BillingEntry | None = None,
                wholesale: dict[str, int] | None = None,
                merchants: dict[str, str] | None = None, variant: str | None = None,
                merchant_name: str = DEMO_MERCHANT) -> SpConfig:
    """An SP selling the demo merchant's items (:data:`DEMO_ITEMS`) at ``merchant_url``, its
    database and journals in ``folder`` (made if missing); ``wholesale``: agreed prices by sku.
    ``merchants`` (name -> merchant server URL) adds more merchants selling the same items
    (seed FIG. 3C, 4A, 4B: one SP catalogue, several commerce servers); ``merchant_name``
    names the one at ``merchant_url``."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [demo_merchant(name, url, fee=fee, pass_on_percent=pass_on_percent,
                             wholesale=wholesale, variant=variant)
               for name, url in {merchant_name: merchant_url, **(merchants or {})}.items()]
    return SpConfig(items_of(entries), db_url=db_url or f"sqlite:///{folder / 'sp.db'}",
                    journal_dir=folder / "sp-journals", billing=billing or BillingEntry(),
                    purses=purses)


@dataclass
class Customer:
    id: str
    key: bytes      # the private key (the customer's; kept here for the tests)


@dataclass
class SpStack:
    config: SpConfig
    server: SpServer
    thread: ServerThread
    payer: Payer | None

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def engine(self) -> Any:
        return self.server.engine

    def customer(self, customer: str, credit_limit: int = 10_000) -> Customer:
        private, public = new_key()
        add_customer(self.server.engine, customer, public, credit_limit,
                     self.config.currency_code)
        return Customer(customer, private)

    def order(self, http: httpx.Client, who: Customer, sku: str = "song",
              merchant: str = DEMO_MERCHANT, **kwargs: Any) -> httpx.Response:
        """POST a signed retail order of ``who``; the raw answer."""
        body, headers = signed_order(who.key, who.id, merchant, sku, **kwargs)
        return http.post(f"{self.url}/v1/orders", content=body, headers=headers)

    def restart(self, payer: Payer | None = None) -> None:
        """Stop the server and start a new one on the same port and database (recovery runs
        at its start); ``payer`` replaces the pool when given."""
        port = self.thread.port
        self.thread.stop()
        self.server.close()
        self.payer = payer or self.payer
        self.server = SpServer(self.config, self.payer, clock=self.server.clock)
        self.thread = ServerThread(self.server.app(), port=port).start()

    def close(self) -> None:
        self.thread.stop()
        self.server.close()


def start_sp(config: SpConfig, payer: Payer | None = None, *,
             clock: Callable[[], float] = time.time, port: int | None = None) -> SpStack:
    """The SP server on loopback with ``payer`` (default: the configured purse pool)."""
    server = SpServer(config, payer, clock=clock)
    try:
        thread = ServerThread(server.app(), port=port).start()
    except Exception:
        server.close()
        raise
    return SpStack(config, server, thread, payer)
