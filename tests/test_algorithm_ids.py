"""Algorithm ids per issuer (issue 11, finding 4): PBOC texts disagree on what algorithm id 00
and 01 mean, and real cards answer 01 for triple DES. An issuer file says which ids stand for
which algorithm (``algorithm_ids``); the PSAM and the HSM refuse (9403) only an id the issuer
does not know, and without the table they keep the old rule (exactly the key's own id)."""

from __future__ import annotations

from pathlib import Path

import pytest

from svcard.card.image import save_new_image
from svcard.card.personalise import ProfileError, image_from_profile
from svcard.card.storage import read_image
from svcard.fixtures import fixture_path
from svcard.host.terminal import purse as T
from svcard.host.terminal.reader_specs import open_reader

BOTH = 'algorithm_ids = { "00" = "3des", "01" = "3des" }\n'


def issuer_text(*, algorithm: int, table: str = "") -> str:
    """The demo issuer's keys, every key configured with ``algorithm``, and ``table``."""
    text = fixture_path("demo-issuer.toml").read_text()
    return table + text.replace("algorithm = 0", f"algorithm = {algorithm}")


def setup(folder: Path, *, card_algorithm: int, server_table: str) -> dict[str, str]:
    """A card personalised with keys of ``card_algorithm`` (so it answers that id), and a
    PSAM and an HSM whose issuer file keeps the keys at 00 with ``server_table``."""
    (folder / "card-issuer.toml").write_text(issuer_text(
        algorithm=card_algorithm,
        table='algorithm_ids = { "00" = "3des", "01" = "3des", "02" = "3des" }\n'))
    (folder / "server-issuer.toml").write_text(issuer_text(algorithm=0, table=server_table))
    iep = fixture_path("iep-demo.toml").read_text().replace('"demo-issuer.toml"',
                                                           '"card-issuer.toml"')
    (folder / "iep.toml").write_text(iep)
    psam = fixture_path("psam-demo.toml").read_text().replace('"demo-issuer.toml"',
                                                              '"server-issuer.toml"')
    (folder / "psam.toml").write_text(psam)
    (folder / "hsm.toml").write_text('kind = "hsm"\nissuers = ["server-issuer.toml"]\n')
    out = {}
    for kind in ("iep", "psam", "hsm"):
        image = image_from_profile(folder / f"{kind}.toml")
        if kind == "iep":
            image["app"]["ep"]["balance"] = 10000
        save_new_image(folder / f"{kind}.json", image)
        out[kind] = f"virtual:{folder / f'{kind}.json'}"
    return out


def test_card_answering_01_pays_and_loads_where_the_issuer_maps_01_to_3des(
        tmp_path: Path) -> None:
    r = setup(tmp_path, card_algorithm=1, server_table=BOTH)
    with open_reader(r["iep"]) as card, open_reader(r["psam"]) as sam:
        receipt = T.purchase(card, sam, 2500)
    assert receipt.balance_after == 7500
    with open_reader(r["iep"]) as card, open_reader(r["hsm"]) as hsm:
        loaded = T.load(card, hsm, 1000, terminal_id=bytes.fromhex("0000000000AA"))
    assert loaded.balance_after == 8500
    assert read_image(tmp_path / "psam.json")["app"]["next_ttn"] == 2


@pytest.mark.parametrize(("card_algorithm", "server_table"), [
    (2, BOTH),      # an id the issuer does not know
    (1, ""),        # no table: exactly the key's id (00), as before
])
def test_an_unknown_id_is_9403_and_nothing_changes(tmp_path: Path, card_algorithm: int,
                                                   server_table: str) -> None:
    r = setup(tmp_path, card_algorithm=card_algorithm, server_table=server_table)
    before = {k: read_image(tmp_path / f"{k}.json")["app"] for k in ("iep", "psam", "hsm")}
    with open_reader(r["iep"]) as card, open_reader(r["psam"]) as sam, \
            pytest.raises(Exception, match="9403"):
        T.purchase(card, sam, 2500)
    with open_reader(r["iep"]) as card, open_reader(r["hsm"]) as hsm, \
            pytest.raises(Exception, match="9403"):
        T.load(card, hsm, 1000, terminal_id=bytes.fromhex("0000000000AA"))
    after = {k: read_image(tmp_path / f"{k}.json")["app"] for k in ("iep", "psam", "hsm")}
    assert after == before


def test_the_table_is_in_the_psam_and_hsm_images(tmp_path: Path) -> None:
    setup(tmp_path, card_algorithm=1, server_table=BOTH)
    psam = read_image(tmp_path / "psam.json")["app"]
    scheme = {"algorithms": {"00": "3des", "01": "3des"}, "mac_scheme": "pboc"}
    assert psam["issuer_schemes"] == {"1000000000000001": scheme}
    assert read_image(tmp_path / "hsm.json")["app"]["issuers"][0]["scheme"] == scheme
    # an issuer file without the table writes no table (images as before)
    (tmp_path / "psam.toml").write_text((tmp_path / "psam.toml").read_text().replace(
        "server-issuer.toml", str(fixture_path("demo-issuer.toml"))))
    assert "issuer_schemes" not in image_from_profile(tmp_path / "psam.toml")["app"]


@pytest.mark.parametrize(("table", "message"), [
    ('algorithm_ids = { "1" = "3des" }\n',
     'algorithm_ids.1 (the key): expected two hex digits, got "1"'),
    ('algorithm_ids = { "01" = "sm4" }\n',
     'algorithm_ids.01: expected one of 3des, got "sm4"'),
    ('algorithm_ids = { "01" = "3des" }\n',
     "purchase_keys[0].algorithm: 00 is not in algorithm_ids"),
    ('algorithm_ids = ["00"]\n', "algorithm_ids: expected a table"),
])
def test_bad_tables_name_the_file_and_field(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "issuer.toml").write_text(issuer_text(algorithm=0, table=table))
    (tmp_path / "psam.toml").write_text(fixture_path("psam-demo.toml").read_text().replace(
        '"demo-issuer.toml"', '"issuer.toml"'))
    with pytest.raises(ProfileError) as err:
        image_from_profile(tmp_path / "psam.toml")
    text = str(err.value)
    assert "issuer.toml" in text and message in text, text
    assert "\n" not in text


def test_two_keys_of_one_version_are_told_apart_by_their_exact_id(tmp_path: Path) -> None:
    """With an algorithm-id table, a PSAM holding two keys of one version (ids 00 and 01,
    both 3des) takes the key personalised with the card's exact id, not the first accepted."""
    from svcard.card.image import save_new_image
    from svcard.card.personalise import image_from_profile
    from svcard.fixtures import fixture_path
    from svcard.host.terminal import purse as T
    from svcard.host.terminal.reader_specs import open_reader

    iep = image_from_profile(fixture_path("iep-demo.toml"))
    psam = image_from_profile(fixture_path("psam-demo.toml"))
    second = next(k for k in iep["app"]["purchase_keys"] if k["version"] == 2)
    second["version"], second["algorithm"] = 1, 1       # the card answers version 1, id 01
    iep["app"]["ep"]["balance"] = 1000
    psam["app"]["keys"][1]["version"], psam["app"]["keys"][1]["algorithm"] = 1, 1
    psam["app"]["issuer_schemes"] = {"1000000000000001": {
        "algorithms": {"00": "3des", "01": "3des"}, "mac_scheme": "pboc"}}
    save_new_image(tmp_path / "iep.json", iep)
    save_new_image(tmp_path / "psam.json", psam)
    with open_reader(f"virtual:{tmp_path / 'iep.json'}") as card, \
            open_reader(f"virtual:{tmp_path / 'psam.json'}") as sam:
        receipt = T.purchase(card, sam, 100, key_index=second["index"])
    assert receipt.balance_after == 900
