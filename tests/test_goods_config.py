"""The goods system's file (goods.toml): read by each party for its own role, one-line errors
naming the file and field (exit 3 from ``svcard serve goods-*``), and no key in a repr, an
error or a log line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from svcard.host.cli.main import main
from svcard.host.goods import wire as W
from svcard.host.goods.config import ROLES, goods_config
from svcard.host.goods.device import Device
from svcard.host.goods.stack import write_system
from svcard.host.kit.config import ConfigError


def test_each_party_reads_its_own_key(tmp_path: Path) -> None:
    path = write_system(tmp_path)
    for role in ROLES:
        config = goods_config(path, role)
        key = W.read_private_key(tmp_path / f"{role}.key")
        assert config.private_key == key and config.me.public_key == W.public_of(key)
        assert key.hex() not in repr(config) and key.hex().upper() not in repr(config)
    fulfil = goods_config(path, "fulfil")
    assert fulfil.goods_issuer == tmp_path / "goods-key.toml"   # the goods key only (G4)
    assert {i.sku for i in fulfil.system.items.values()} == {"ticket", "coupon", "airtime",
                                                             "rides10"}
    device = Device("http://x", "auth1", bytes(32), W.new_key())
    assert device.key.hex() not in repr(device)


@pytest.mark.parametrize(("change", "field"), [
    (('price = 1250', 'price = -1'), "item[0].price"),
    (('kind = "ticket"', 'kind = "pony"'), "item[0].kind"),
    (('currency_code = 156', 'currency_code = 156\ncolour = 1'), "colour"),
    (('id = "bank1"', 'id = "bank 1"'), "parties.bank.id"),
])
def test_a_bad_file_is_one_line_naming_the_field(tmp_path: Path, change: tuple[str, str],
                                                 field: str) -> None:
    path = write_system(tmp_path)
    path.write_text(path.read_text().replace(*change, 1))
    with pytest.raises(ConfigError) as bad:
        goods_config(path, "merchant")
    assert str(bad.value).startswith(str(path)) and field in str(bad.value)
    result = CliRunner().invoke(main, ["serve", "goods-merchant", "--config", str(path)])
    assert result.exit_code == 3 and field in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_key_that_cannot_be_used_is_named_not_shown(tmp_path: Path) -> None:
    path = write_system(tmp_path)
    (tmp_path / "bank.key").write_text("zz" * 32)
    with pytest.raises(ConfigError) as bad:
        goods_config(path, "bank")
    assert "private_key" in str(bad.value) and "zz" * 8 not in str(bad.value)
    result = CliRunner().invoke(main, ["device", "register", "--auth", "http://127.0.0.1:9",
                                       "--auth-id", "auth1", "--auth-key", "00" * 32, "--key",
                                       str(tmp_path / "nope.key")])
    assert result.exit_code == 3 and "nope.key" in result.output
