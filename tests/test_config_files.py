"""Configuration files and card profiles, checked by their pydantic models: for every kind, an
unknown key, a wrong type, a missing key and a bad hex length are refused with one line naming
the file and the field path; a secret comes from the file itself, from ``X_file`` or from
``X_env`` (exactly one); and no error ever holds a secret's value."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from svcard.card.personalise import ProfileError, image_from_profile, load_issuer
from svcard.fixtures import fixture_path
from svcard.host.kit.command_line import EXIT_INPUT
from svcard.host.kit.config import ConfigError
from svcard.host.load.config import bank_config, load_config
from svcard.host.pay.config import merchant_config, payment_config
from svcard.host.settle.config import clearing_config

MERCHANT_ID = bytes.fromhex("4D45524348303031")
BANK_ID = bytes.fromhex("42414E4B30303031")
ENV = "SVCARD_TEST_SECRET"


@dataclass(frozen=True)
class Kind:
    """A kind of file: its demo fixture, what reads it, and one of its secrets."""

    fixture: str
    read: Callable[[Path], Any]
    secret_key: str                    # the TOML key of a secret, as the fixture writes it
    secret: Callable[[Any], Any]       # that secret, as read
    other_secret: str                  # a valid value of it, other than the fixture's

    @property
    def name(self) -> str:
        return self.fixture.replace("-demo", "")

    def write(self, folder: Path, text: str | None = None) -> Path:
        """The fixture (or ``text``) as ``folder/NAME``, beside the demo issuer file."""
        (folder / "demo-issuer.toml").write_text(fixture_path("demo-issuer.toml").read_text())
        path = folder / self.name
        path.write_text(fixture_path(self.fixture).read_text() if text is None else text)
        return path

    def fixture_secret(self) -> str:
        text = fixture_path(self.fixture).read_text()
        found = re.search(rf'^\s*{self.secret_key} = "([^"]*)"', text, re.M)
        assert found, f"{self.fixture} has no {self.secret_key}"
        return found.group(1)

    def with_secret_line(self, line: str) -> str:
        """The fixture with its secret's line replaced by ``line`` (``{}`` is the old line)."""
        text = fixture_path(self.fixture).read_text()
        new, count = re.subn(rf'^(\s*){self.secret_key} = "[^"]*"',
                             lambda m: m.group(1) + line.format(m.group(0).strip()), text,
                             count=1, flags=re.M)
        assert count == 1
        return new


def _key(hex_text: str) -> bytes:
    return bytes.fromhex(hex_text)


KINDS = {
    "payment": Kind("payment-demo.toml", payment_config, "shared_key",
                    lambda c: c.merchants[MERCHANT_ID].shared_key.hex().upper(), "A5" * 32),
    "merchant": Kind("merchant-demo.toml", merchant_config, "shared_key",
                     lambda c: c.shared_key.hex().upper(), "5A" * 32),
    "load": Kind("load-demo.toml", load_config, "shared_key",
                 lambda c: c.banks[BANK_ID].shared_key.hex().upper(), "C3" * 32),
    "bank": Kind("bank-demo.toml", bank_config, "shared_key",
                 lambda c: c.shared_key.hex().upper(), "3C" * 32),
    "clearing": Kind("clearing-demo.toml", clearing_config, "settlement_key",
                     lambda c: c.settlement_key.hex().upper(), "96" * 32),
    "issuer": Kind("demo-issuer.toml", load_issuer, "tac_master_key",
                   lambda i: i.tac.hex().upper(), "69" * 16),
    "psam": Kind("psam-demo.toml", image_from_profile, "batch_key",
                 lambda image: image["app"]["batch_key"], "0F" * 16),
    "iep": Kind("iep-demo.toml", image_from_profile, "value",
                lambda image: image["app"]["pin"], "4321"),
}


def refused(kind: Kind, path: Path) -> str:
    """The one-line message ``kind`` refuses ``path`` with; it never holds a secret."""
    error = ProfileError if kind.read in (load_issuer, image_from_profile) else ConfigError
    with pytest.raises(error) as caught:
        kind.read(path)
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    for secret in (kind.fixture_secret(), kind.other_secret):
        assert secret.lower() not in message.lower(), message
    return message


# (kind, text replaced, replacement, the message expected after the folder)
CASES = [
    # unknown keys, with their path
    ("payment", 'variants = ["fig5"', 'variantz = ["fig5"',
     "payment.toml: merchant[0].variantz: unknown key"),
    ("merchant", "order_lifetime = 600", "order_lifetme = 600",
     "merchant.toml: order_lifetme: unknown key"),
    ("load", "[[bank]]\n", '[[bank]]\nname = "bank one"\n', "load.toml: bank[0].name: unknown key"),
    ("bank", "secret_max_failures = 5", "secret_max_failure = 5",
     "bank.toml: secret_max_failure: unknown key"),
    ("clearing", 'acquirer_id = "4143515530303031"',
     'acquirer_id = "4143515530303031"\nacquirer = "x"', "clearing.toml: terminal[0].acquirer: "
     "unknown key"),
    ("issuer", "[[load_keys]]\n", "[[load_keys]]\nlabel = 1\n",
     "demo-issuer.toml: load_keys[0].label: unknown key"),
    ("psam", "next_ttn = 1", "next_ttn = 1\nnext_tnn = 2", "psam.toml: next_tnn: unknown key"),
    ("iep", "[holder]\n", "[holder]\nage = 40\n", "iep.toml: holder.age: unknown key"),
    # wrong types, the value shown (never a secret's)
    ("payment", "# max_holds_per_client = 1", 'max_holds_per_client = "one"',
     'payment.toml: max_holds_per_client: expected a whole number >= 1, got "one"'),
    ("merchant", "order_lifetime = 600", 'order_lifetime = "600"',
     'merchant.toml: order_lifetime: expected a whole number >= 1, got "600"'),
    ("load", "acquire_timeout = 2.0", "acquire_timeout = true",
     "load.toml: acquire_timeout: expected a number > 0, got true"),
    ("bank", "secret_max_failures = 5", 'secret_max_failures = "five"',
     'bank.toml: secret_max_failures: expected a whole number >= 0, got "five"'),
    ("clearing", 'merchant_id = "4D45524348303031"', "merchant_id = 5",
     "clearing.toml: terminal[0].merchant_id: expected a hex string, got 5"),
    ("issuer", "diversify_by_issuer = false", 'diversify_by_issuer = "no"',
     'demo-issuer.toml: diversify_by_issuer: expected true or false, got "no"'),
    ("psam", "next_ttn = 1", "next_ttn = -1",
     "psam.toml: next_ttn: expected a whole number from 0 to 4294967295, got -1"),
    ("iep", "try_limit = 3", "try_limit = 3.0",
     "iep.toml: pin.try_limit: expected a whole number from 1 to 15, got 3.0"),
    ("payment", '"fig8"]', '"fig9"]',
     'payment.toml: merchant[0].variants[3]: expected one of fig5, fig6, fig7, fig8, got "fig9"'),
    ("bank", 'load_url = "http://127.0.0.1:8084"', 'load_url = "127.0.0.1:8084"',
     'bank.toml: load_url: expected an http:// or https:// URL, got "127.0.0.1:8084"'),
    ("payment", 'admin_token = "demo-admin-token"', "admin_token = 12345678",
     "payment.toml: admin_token: expected a string"),
    # missing keys
    ("payment", 'id = "4D45524348303031"', "", "payment.toml: merchant[0].id: missing (required)"),
    ("merchant", 'payment_url = "http://127.0.0.1:8080"', "",
     "merchant.toml: payment_url: missing (required)"),
    ("load", 'terminal_id = "000000000009"', "", "load.toml: terminal_id: missing (required)"),
    ("bank", 'load_url = "http://127.0.0.1:8084"', "", "bank.toml: load_url: missing (required)"),
    ("clearing", 'acquirer_id = "4143515530303031"', "",
     "clearing.toml: terminal[0].acquirer_id: missing (required)"),
    ("issuer", 'tac_master_key = "A8DEE6957229C12524F50353A5F068F3"', "",
     "demo-issuer.toml: tac_master_key: missing (required)"),
    ("psam", 'psam_serial = "00000000000000000001"', "", "psam.toml: psam_serial: missing "
     "(required)"),
    ("iep", "start_date = 2026-01-01", "", "iep.toml: start_date: missing (required)"),
    # hex of the wrong length (a secret's value never shown)
    ("payment", 'shared_key = "398359B0', 'shared_key = "59B0',
     "payment.toml: merchant[0].shared_key: expected 32 bytes of hex, got 30"),
    ("merchant", 'terminal_id = "000000000001"', 'terminal_id = "0001"',
     "merchant.toml: terminal_id: expected 6 bytes of hex, got 2"),
    ("load", 'id = "42414E4B30303031"', 'id = "42414E4B3030"',
     "load.toml: bank[0].id: expected 8 bytes of hex, got 6"),
    ("bank", 'shared_key = "30AC', 'shared_key = "ZZ30AC',
     "bank.toml: shared_key: not hex"),
    ("clearing", 'batch_key = "311B', 'batch_key = "1B',
     "clearing.toml: terminal[0].batch_key: expected 16 bytes of hex, got 15"),
    ("issuer", 'master_key = "836909A138FAA7577D7B94C561F98D24"', 'master_key = "836909A1"',
     "demo-issuer.toml: purchase_keys[0].master_key: expected 16 bytes of hex, got 4"),
    ("psam", 'terminal_id = "000000000001"', 'terminal_id = "01"',
     "psam.toml: terminal_id: expected 6 bytes of hex, got 1"),
    ("iep", '# fixed_random = "11223344"', 'fixed_random = "1122"',
     "iep.toml: fixed_random: expected 4 bytes of hex, got 2"),
]


@pytest.mark.parametrize(("kind", "old", "new", "expected"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_bad_field_is_named_with_its_file_and_path(tmp_path: Path, kind: str, old: str,
                                                     new: str, expected: str) -> None:
    k = KINDS[kind]
    text = fixture_path(k.fixture).read_text()
    assert old in text
    message = refused(k, k.write(tmp_path, text.replace(old, new, 1)))
    assert message.startswith(str(tmp_path / expected.split(":")[0]) + ":"), message
    assert expected in message, message
    assert "12345678" not in message  # the admin token given as a number


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_fixture_is_read_as_before(tmp_path: Path, kind: str) -> None:
    k = KINDS[kind]
    assert k.secret(k.read(k.write(tmp_path))).upper() == k.fixture_secret().upper()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_secret_from_a_file_relative_to_the_configuration(tmp_path: Path, kind: str) -> None:
    k = KINDS[kind]
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "secret.txt").write_text(f"\n  {k.other_secret}  \n")
    path = k.write(tmp_path, k.with_secret_line(f'{k.secret_key}_file = "secrets/secret.txt"'))
    assert k.secret(k.read(path)).upper() == k.other_secret


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_secret_from_the_environment(tmp_path: Path, kind: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    k = KINDS[kind]
    monkeypatch.setenv(ENV, k.other_secret)
    path = k.write(tmp_path, k.with_secret_line(f'{k.secret_key}_env = "{ENV}"'))
    assert k.secret(k.read(path)).upper() == k.other_secret


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_secret_given_twice_is_refused(tmp_path: Path, kind: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    k = KINDS[kind]
    monkeypatch.setenv(ENV, k.other_secret)
    path = k.write(tmp_path, k.with_secret_line(f'{{}}\n{k.secret_key}_env = "{ENV}"'))
    message = refused(k, path)
    assert f"{k.name}: " in message
    assert (f"{k.secret_key}_env: give one of {k.secret_key}, {k.secret_key}_file, "
            f"{k.secret_key}_env, not {k.secret_key} and {k.secret_key}_env") in message


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_missing_secret_file_or_variable_is_named(tmp_path: Path, kind: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    k = KINDS[kind]
    monkeypatch.delenv(ENV, raising=False)
    message = refused(k, k.write(tmp_path, k.with_secret_line(f'{k.secret_key}_env = "{ENV}"')))
    assert f'{k.secret_key}_env: the environment variable "{ENV}" is not set' in message
    message = refused(k, k.write(tmp_path, k.with_secret_line(f'{k.secret_key}_file = "no.txt"')))
    assert f"{k.secret_key}_file: cannot read {tmp_path / 'no.txt'}" in message
    monkeypatch.setenv(ENV, " \n")
    message = refused(k, k.write(tmp_path, k.with_secret_line(f'{k.secret_key}_env = "{ENV}"')))
    assert f'{k.secret_key}_env: the environment variable "{ENV}" is empty' in message
    (tmp_path / "empty.txt").write_text("\n")
    message = refused(k, k.write(tmp_path, k.with_secret_line(f'{k.secret_key}_file = '
                                                              '"empty.txt"')))
    assert f"{k.secret_key}_file: {tmp_path / 'empty.txt'} is empty" in message


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_bad_secret_from_a_file_is_not_shown(tmp_path: Path, kind: str) -> None:
    k = KINDS[kind]
    (tmp_path / "secret.txt").write_text("not-a-secret-but-private")
    message = refused(k, k.write(tmp_path, k.with_secret_line(f'{k.secret_key}_file = '
                                                              '"secret.txt"')))
    assert "private" not in message and f"{k.secret_key}" in message


def test_every_secret_of_the_servers_may_come_from_elsewhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin token and the database URL (which may hold a password) are secrets too."""
    monkeypatch.setenv("SVCARD_ADMIN", "token-from-env")
    (tmp_path / "db.url").write_text("sqlite:///from-file.db\n")
    text = fixture_path("payment-demo.toml").read_text().replace(
        'admin_token = "demo-admin-token"', 'admin_token_env = "SVCARD_ADMIN"').replace(
        'db = "sqlite:///payments.db"', 'db_file = "db.url"')
    path = tmp_path / "payment.toml"
    path.write_text(text)
    config = payment_config(path)
    assert config.admin_token == "token-from-env"
    assert config.db_url == "sqlite:///from-file.db"
    assert payment_config(path, "sqlite:///cli.db").db_url == "sqlite:///cli.db"
    path.write_text(text.replace('admin_token_env = "SVCARD_ADMIN"',
                                 'admin_token = ["token-in-a-list"]'))
    with pytest.raises(ConfigError) as caught:
        payment_config(path)
    assert str(caught.value) == f"{path}: admin_token: expected a string"


def test_a_terminal_id_file_is_not_a_secret_source(tmp_path: Path) -> None:
    """Only secret fields take ``_file``/``_env``; anywhere else the key is unknown."""
    text = fixture_path("merchant-demo.toml").read_text().replace(
        'terminal_id = "000000000001"', 'terminal_id_env = "HOME"')
    path = tmp_path / "merchant.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        merchant_config(path)
    assert str(caught.value) == (f"{path}: terminal_id: missing (required); "
                                 "terminal_id_env: unknown key")


def test_duplicates_and_cross_field_rules_name_the_field(tmp_path: Path) -> None:
    text = fixture_path("payment-demo.toml").read_text()
    entry = text[text.index("[[merchant]]"):]
    path = tmp_path / "payment.toml"
    path.write_text(text + "\n" + entry)
    with pytest.raises(ConfigError, match=re.escape(
            f"{path}: merchant[1].id: 4D45524348303031 is given twice")):
        payment_config(path)
    path = tmp_path / "merchant.toml"
    path.write_text(fixture_path("merchant-demo.toml").read_text().replace(
        'default_variant = "fig6"', 'default_variant = "fig7"'))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: default_variant: fig7")):
        merchant_config(path)
    path.write_text(fixture_path("merchant-demo.toml").read_text() + '"zz" = "00"\n')
    with pytest.raises(ConfigError) as caught:
        merchant_config(path)
    assert str(caught.value).startswith(
        f'{path}: client_terminals.zz (the key): not hex, got "zz"; ')


def test_profile_overrides_are_checked_like_the_file() -> None:
    with pytest.raises(ProfileError) as caught:
        image_from_profile(fixture_path("psam-demo.toml"), psam_serial="0001", colour="red")
    assert str(caught.value) == (f"{fixture_path('psam-demo.toml')}: psam_serial: expected 10 "
                                 "bytes of hex, got 2; colour: unknown key")


def test_many_problems_stay_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bank.toml"
    path.write_text("a = 1\nb = 2\nc = 3\nd = 4\n")
    with pytest.raises(ConfigError) as caught:
        bank_config(path)
    message = str(caught.value)
    assert message == (f"{path}: bank_id: missing (required); shared_key: missing (required); "
                       "load_url: missing (required); terminal_id: missing (required); "
                       "a: unknown key (and 3 more)")


@pytest.mark.parametrize(("text", "problem"), [
    ("x = ", "not valid TOML"),
    (None, "no such file"),
])
def test_an_unreadable_file_is_named(tmp_path: Path, text: str | None, problem: str) -> None:
    path = tmp_path / "load.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_serve_refuses_a_bad_configuration_in_one_line(tmp_path: Path) -> None:
    """What a person sees: ``svcard serve bank`` with a mistyped limit."""
    from svcard.host.cli.main import main

    path = tmp_path / "bank.toml"
    path.write_text(fixture_path("bank-demo.toml").read_text().replace(
        "secret_max_failures = 5", 'secret_max_failures = "five"'))
    result = CliRunner().invoke(main, ["serve", "bank", "--config", str(path), "--db",
                                       f"sqlite:///{tmp_path / 'bank.db'}"])
    assert result.exit_code == EXIT_INPUT, result.output
    assert (f'{path}: secret_max_failures: expected a whole number >= 0, got "five"'
            in result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "bank.db").exists()


def test_no_server_configuration_prints_a_secret_or_a_database_password() -> None:
    """The reprs of the configurations (they reach logs and tracebacks) hold no key, token or
    database password."""
    from svcard.host.load.bank.server import BankConfig
    from svcard.host.load.server.app import BankAccount, LoadConfig
    from svcard.host.pay.server.app import MerchantAccount, PaymentConfig

    key, url = bytes(range(32)), "postgresql+psycopg://svcard:pw-SECRET@db/pay"
    configs = [
        PaymentConfig({b"M" * 8: MerchantAccount(b"M" * 8, key, frozenset({6}))}, db_url=url,
                      admin_token="token-SECRET"),
        LoadConfig({b"B" * 8: BankAccount(b"B" * 8, key)}, b"T" * 6, db_url=url),
        BankConfig(b"B" * 8, key, "http://127.0.0.1:1", b"T" * 6, db_url=url),
    ]
    for config in configs:
        text = repr(config)
        assert "SECRET" not in text and key.hex() not in text and repr(key) not in text, text
