from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from svcard.card.iep import IepState
from svcard.card.image import card_from_image, save_new_image
from svcard.card.personalise import image_from_profile
from svcard.card.runtime import Card
from svcard.fixtures import fixture_path
from svcard.host.demo.system import System, card_image, start_system
from svcard.host.load import client as LC
from svcard.host.pay.stack import Stack, start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.reader.jcardsim import JCardSimError, JCardSimReader

_CACHE: dict[str, dict[str, Any]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("svcard simulation")
    group.addoption("--sim-ops", type=int, default=None,
                    help="operations in the whole-system simulation (default 2000, or "
                         "SVCARD_SIM_OPS)")
    group.addoption("--sim-seed", type=int, default=None,
                    help="the simulation's seed (default 20261122, or SVCARD_SIM_SEED)")
    group.addoption("--diff-count", type=int, default=None,
                    help="APDUs of the IEP differential test (default 1000, or "
                         "SVCARD_DIFF_COUNT)")
    group.addoption("--diff-seed", type=int, default=None,
                    help="the IEP differential test's seed (default 20261122, or "
                         "SVCARD_DIFF_SEED)")
    group.addoption("--sp-orders", type=int, default=None,
                    help="orders in the service provider's simulation (default 150, or "
                         "SVCARD_SP_ORDERS)")
    group.addoption("--sp-seed", type=int, default=None,
                    help="the SP simulation's seed (default 20261122, or SVCARD_SP_SEED)")
    group.addoption("--node-kills", type=int, default=None,
                    help="SIGKILLs of payment-server nodes in tests/test_nodes.py (default 5, "
                         "or SVCARD_NODE_KILLS)")
    group.addoption("--load-node-kills", type=int, default=None,
                    help="SIGKILLs of load-server nodes in tests/test_load_nodes.py (default 4, "
                         "or SVCARD_LOAD_NODE_KILLS)")
    group.addoption("--node-seed", type=int, default=None,
                    help="the node kill test's seed (default 20261122, or SVCARD_NODE_SEED)")
    for option, env, what in GOODS_OPTIONS:
        group.addoption(option, type=int, default=None, help=f"{what} (or {env})")


# the goods tests read these environment variables when imported: an option sets its variable
GOODS_OPTIONS = (
    ("--goods-runs", "SVCARD_GOODS_RUNS", "goods bought in tests/test_goods_random.py"),
    ("--goods-seed", "SVCARD_GOODS_SEED", "tests/test_goods_random.py's seed"),
    ("--goods-kill-runs", "SVCARD_GOODS_KILL_RUNS", "runs of tests/test_goods_kills.py"),
    ("--goods-kills", "SVCARD_GOODS_KILLS", "SIGKILLs per run of tests/test_goods_kills.py"),
    ("--goods-kill-seed", "SVCARD_GOODS_KILL_SEED", "tests/test_goods_kills.py's seed"),
    ("--goods-audit-runs", "SVCARD_GOODS_AUDIT_RUNS", "goods in test_goods_audit.py's random run"),
    ("--goods-audit-seed", "SVCARD_GOODS_AUDIT_SEED", "test_goods_audit.py's random seed"),
    ("--wallet-payments", "SVCARD_WALLET_PAYMENTS",
     "payments in tests/test_wallet_random.py (default 150)"),
    ("--wallet-seed", "SVCARD_WALLET_SEED", "tests/test_wallet_random.py's seed"),
    ("--goods-sim-runs", "SVCARD_GOODS_SIM_RUNS", "goods in tests/test_goods_random_run.py"),
    ("--goods-sim-kills", "SVCARD_GOODS_SIM_KILLS", "SIGKILLs in test_goods_random_run.py"),
    ("--goods-sim-devices", "SVCARD_GOODS_SIM_DEVICES", "device threads of that run"),
    ("--goods-sim-pickup", "SVCARD_GOODS_SIM_PICKUP", "that run's pick-up deadline (s)"),
    ("--goods-sim-seed", "SVCARD_GOODS_SIM_SEED", "tests/test_goods_random_run.py's seed"),
)


def pytest_configure(config: pytest.Config) -> None:
    for option, env, _ in GOODS_OPTIONS:
        value = config.getoption(option)
        if value is not None:
            os.environ[env] = str(value)


@pytest.fixture
def sim_ops(request: pytest.FixtureRequest) -> int:
    value = request.config.getoption("--sim-ops")
    return int(value if value is not None else os.environ.get("SVCARD_SIM_OPS", "2000"))


@pytest.fixture
def sim_seed(request: pytest.FixtureRequest) -> int:
    value = request.config.getoption("--sim-seed")
    return int(value if value is not None else os.environ.get("SVCARD_SIM_SEED", "20261122"))


@pytest.fixture
def diff_count(request: pytest.FixtureRequest) -> int:
    value = request.config.getoption("--diff-count")
    return int(value if value is not None else os.environ.get("SVCARD_DIFF_COUNT", "1000"))


@pytest.fixture
def diff_seed(request: pytest.FixtureRequest) -> int:
    value = request.config.getoption("--diff-seed")
    return int(value if value is not None else os.environ.get("SVCARD_DIFF_SEED", "20261122"))


@pytest.fixture
def sp_orders(request: pytest.FixtureRequest) -> int:
    value = request.config.getoption("--sp-orders")
    return int(value if value is not None else os.environ.get("SVCARD_SP_ORDERS", "150"))


@pytest.fixture
def node_kills(request: pytest.FixtureRequest) -> int:
    value = request.config.getoption("--node-kills")
    return int(value if value is not None else os.environ.get("SVCARD_NODE_KILLS", "5"))


@pytest.fixture
def load_node_kills(request: pytest.FixtureRequest) -> int:
    value = request.config.getoption("--load-node-kills")
    return int(value if value is not None else os.environ.get("SVCARD_LOAD_NODE_KILLS", "4"))


@pytest.fixture
def node_seed(request: pytest.FixtureRequest) -> int:
    value = request.config.getoption("--node-seed")
    return int(value if value is not None else os.environ.get("SVCARD_NODE_SEED", "20261122"))


@pytest.fixture
def sp_seed(request: pytest.FixtureRequest) -> int:
    value = request.config.getoption("--sp-seed")
    return int(value if value is not None else os.environ.get("SVCARD_SP_SEED", "20261122"))


class AppletCard:
    """The applet in one jCardSim simulator, as a card: ``transmit``, ``reset``, ``close``.

    jCardSim raises on an APDU shorter than 4 bytes or whose Lc/Le do not fit its length, before
    any applet code runs; a card's transport answers such an APDU 6700, and so does this (the
    only answer changed)."""

    def __init__(self, reader: JCardSimReader) -> None:
        self.reader = reader

    def transmit(self, apdu: bytes) -> bytes:
        try:
            return self.reader.transmit(apdu)
        except JCardSimError as exc:
            if "C-APDU" in str(exc) or "malformed APDU" in str(exc):
                return b"\x67\x00"
            raise

    def reset(self) -> None:
        """Power-cycle the simulator (volatile state goes, the applet's data stays)."""
        from svcard.reader.jcardsim import _java_call
        sim = self.reader._sim
        _java_call(lambda: sim.reset(), "reset")

    def close(self) -> None:
        self.reader.disconnect()


@dataclass(frozen=True)
class AppletCards:
    """svcard's IEP applet, built once per session, in this process's one JVM (its class path
    is fixed at start: every in-process jCardSim user takes its classes from here)."""

    jar: str
    classes: Path

    def open(self, image: dict[str, Any], *, cbc_mac: bool = False) -> AppletCard:
        """A fresh simulator with the applet installed and personalised from ``image``
        (``cbc_mac``: the applet's own DES-CBC MAC instead of the Signature one)."""
        from svcard.card import applet
        state = IepState.from_json(image["app"])
        reader = JCardSimReader(applet.APPLET_CLASS, state.aid,
                                install_params=applet.install_params(state, cbc_mac=cbc_mac),
                                personalise=applet.personalisation_apdus(state),
                                jar=self.jar, classpath=(str(self.classes),),
                                # the Python card of a t0 = false image is a T=1 card (the
                                # applet looks for data on a case-2 command only in T=1)
                                protocol="T=0" if image.get("t0") else "T=1")
        reader.connect()
        return AppletCard(reader)


@pytest.fixture(scope="session")
def iep_applet(tmp_path_factory: pytest.TempPathFactory) -> AppletCards:
    """The IEP applet in jCardSim; skips (users) when JCARDSIM_JAR names no jar."""
    jar = os.environ.get("JCARDSIM_JAR", "")
    if not jar.endswith(".jar"):
        pytest.skip("JCARDSIM_JAR is not set: the IEP applet runs in jCardSim (set it to the "
                    "jCardSim jar, and JCARDSIM_CLASSPATH to BouncyCastle's bcprov.jar)")
    try:
        import jpype  # noqa: F401
    except ImportError:
        pytest.skip("JPype is not installed (pip install 'svcard[jcardsim]')")
    from svcard.card.applet import build_applet
    # the same folder as tests/test_applet_build.py's: one class path for the process's JVM
    return AppletCards(jar, build_applet(tmp_path_factory.getbasetemp() / "svcard-iep-applet",
                                         jar))


def demo_image(kind: str, **app_changes: Any) -> dict[str, Any]:
    """A fresh copy of a demo card image (iep, psam or hsm), optionally with app fields set."""
    if kind not in _CACHE:
        _CACHE[kind] = image_from_profile(fixture_path(f"{kind}-demo.toml"))
    image = copy.deepcopy(_CACHE[kind])
    image["app"].update(app_changes)
    return image


def with_balance(image: dict[str, Any], ep: int = 0, ed: int = 0) -> dict[str, Any]:
    image["app"]["ep"]["balance"] = ep
    image["app"]["ed"]["balance"] = ed
    return image


@pytest.fixture
def iep() -> Card:
    return card_from_image(demo_image("iep"))


@pytest.fixture
def psam() -> Card:
    return card_from_image(demo_image("psam"))


@pytest.fixture
def hsm() -> Card:
    return card_from_image(demo_image("hsm"))


@pytest.fixture
def image_files(tmp_path: Path) -> dict[str, Path]:
    """Demo IEP (EP balance 100.00), PSAM and HSM images on disk."""
    out = {}
    for kind in ("iep", "psam", "hsm"):
        image = demo_image(kind)
        if kind == "iep":
            with_balance(image, ep=10000)
        out[kind] = tmp_path / f"{kind}.json"
        save_new_image(out[kind], image)
    return out


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A real HTTP client for the loopback servers."""
    with httpx.Client(timeout=30) as client:
        yield client


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    """The whole system on loopback, with a funded account "alice" (secret "pw")."""
    s = start_system(tmp_path / "sys")
    s.load.account("alice", 100_000, "pw")
    yield s
    s.close()


def load_card(system: System, card: Path, journal: Journal, amount: int) -> None:
    """Load ``card`` from alice's account over the network; it must load."""
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        assert LC.load(system.load.bank_url, reader, account="alice", secret="pw",
                       amount=amount, journal=journal, http=http).outcome == "loaded"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """The payment server (two PSAMs) and a merchant on loopback."""
    s = start_stack(tmp_path / "stack", psams=2)
    yield s
    s.close()


@pytest.fixture
def card(tmp_path: Path) -> Path:
    """A demo purse card holding 100.00."""
    return card_image(tmp_path, ep=10_000)
