"""Goods records (protocols/goods.py) and the IEP's goods record files (card/goods.py): layouts,
the write checks every goods write goes through, the image form, the card profile, READ RECORD."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import demo_image
from rawhost import RawHost

from svcard.card.goods import GoodsFiles
from svcard.card.image import ImageError, card_from_image, check_image
from svcard.card.personalise import ProfileError, image_from_profile
from svcard.card.runtime import CardError
from svcard.protocols import goods as G

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DATES = {"valid_from": bytes.fromhex("20260101"), "valid_to": bytes.fromhex("20261231")}
IDS = {"issuer_id": b"MERCHANT", "good_id": bytes(7) + b"\x01"}


def ticket(**fields: object) -> bytes:
    return G.build("ticket", **{**IDS, **DATES, "value": 1500, "reference": b"ROW7SEAT",
                                **fields})


def test_every_kind_is_one_40_byte_record_with_its_tag_first() -> None:
    records = {
        "ticket": ticket(),
        "coupon": G.build("coupon", **IDS, **DATES, value=200, min_spend=1000),
        "transit": G.build("transit", **IDS, **DATES, rides_left=9, rides_total=10, fare=300),
        "voucher": G.build("voucher", **IDS, **DATES, value=5000, code=b"0123456789"),
    }
    for kind, record in records.items():
        assert len(record) == G.RECORD_SIZE
        assert record[0] == G.KINDS[kind] and record[1] == G.STATUS_VALID
        fields = G.parse(record)
        assert fields["kind"] == kind and fields["status_name"] == "valid"
        assert fields["issuer_id"] == b"MERCHANT" and fields["valid_to"] == DATES["valid_to"]
    assert G.parse(records["transit"])["rides_left"] == 9
    assert G.parse(records["voucher"])["code"] == b"0123456789"
    # the head is at fixed offsets, the same for every kind
    assert records["coupon"][2:10] == b"MERCHANT"
    assert records["coupon"][18:22] == b"\x20\x26\x01\x01"


@pytest.mark.parametrize("bad", [
    ticket()[:-1],                                       # short
    b"\x07" + ticket()[1:],                              # unknown tag
    ticket()[:1] + b"\x00" + ticket()[2:],               # unknown status
    ticket()[:18] + bytes.fromhex("20270101") + ticket()[22:],   # from after to
])
def test_a_record_off_its_layout_is_refused(bad: bytes) -> None:
    with pytest.raises(G.GoodsRecordError):
        G.check(bad)


def test_build_refuses_bad_fields() -> None:
    with pytest.raises(G.GoodsRecordError):
        G.build("gift", **IDS, **DATES)
    with pytest.raises(G.GoodsRecordError):
        ticket(valid_to=bytes.fromhex("20261301"))
    with pytest.raises(ValueError):
        ticket(value=1 << 32)


def sw_of(call) -> int:
    with pytest.raises(CardError) as info:
        call()
    return info.value.sw


def test_check_write_names_the_record_or_refuses() -> None:
    files = GoodsFiles()
    assert sorted(files.files) == [0x11, 0x12, 0x13, 0x14]
    assert files.check_write(0x11, 5, G.MODE_RECORD, ticket()) == 5
    assert files.check_write(0x11, G.TAG_TICKET, G.MODE_TAG, ticket()) == 1
    files.apply(0x11, 1, ticket())
    assert files.find(0x11, G.TAG_TICKET) == 1 and files.find(0x11, 0) == 2
    assert files.check_write(0x11, 1, G.MODE_TAG, ticket(status=G.STATUS_USED)) == 1
    other = ticket(good_id=bytes(7) + b"\x02")
    assert files.check_write(0x11, 1, G.MODE_TAG, other) == 2
    assert files.check_write(0x11, 1, G.MODE_TAG, other, {(0x11, 2): other}) == 2
    assert files.check_write(0x11, 1, G.MODE_TAG, ticket(good_id=b"3" * 8),
                             {(0x11, 2): other}) == 3
    assert sw_of(lambda: files.check_write(0x1F, 1, G.MODE_RECORD, ticket())) == 0x6A82
    assert sw_of(lambda: files.check_write(0x11, 1, G.MODE_RECORD, ticket()[:39])) == 0x6700
    assert sw_of(lambda: files.check_write(0x11, 9, G.MODE_RECORD, ticket())) == 0x6A83
    assert sw_of(lambda: files.check_write(0x11, 0, G.MODE_RECORD, ticket())) == 0x6A86
    assert sw_of(lambda: files.check_write(0x11, 1, 0b001, ticket())) == 0x6A86
    assert sw_of(lambda: files.check_write(0x12, 1, G.MODE_RECORD, ticket())) == 0x6A80
    for n in range(2, 9):
        files.apply(0x11, n, ticket(good_id=n.to_bytes(8, "big")))
    assert files.find(0x11, 0) is None
    assert sw_of(lambda: files.check_write(0x11, 1, G.MODE_TAG, ticket(good_id=b"9" * 8))) \
        == 0x6A84
    assert files.read(0x11, 8)[0] == G.TAG_TICKET
    assert sw_of(lambda: files.read(0x11, 9)) == 0x6A83
    assert sw_of(lambda: files.read(0x19, 1)) == 0x6A82
    assert [(sfi, n) for sfi, n, _ in files.goods()] == [(0x11, n) for n in range(1, 9)]


def test_the_image_keeps_only_the_records_that_hold_goods() -> None:
    files = GoodsFiles()
    files.apply(0x13, 4, G.build("transit", **IDS, **DATES, rides_left=1, rides_total=2,
                                 fare=250))
    image = files.to_json()
    assert [f["sfi"] for f in image["files"]] == [0x11, 0x12, 0x13, 0x14]
    assert image["files"][2]["data"] == {"4": files.read(0x13, 4).hex().upper()}
    assert image["files"][0]["data"] == {}
    again = GoodsFiles.from_json(image)
    assert again.to_json() == image
    assert GoodsFiles.from_json(None).to_json() == GoodsFiles().to_json()


@pytest.mark.parametrize(("change", "where"), [
    ({"records": 0}, "app.goods.files[0].records"),
    ({"sfi": 40}, "app.goods.files[0].sfi"),
    ({"kind": "gift"}, "app.goods.files[0].kind"),
    ({"data": {"1": "00"}}, "app.goods.files[0].data.1"),
])
def test_a_damaged_goods_file_in_an_image_is_named(change: dict, where: str) -> None:
    image = demo_image("iep")
    image["app"]["goods"]["files"][0].update(change)
    with pytest.raises(ImageError) as info:
        check_image(image, "card.json")
    assert f"card.json: {where}" in str(info.value)
    with pytest.raises(ImageError):
        card_from_image(image, source="card.json")


def test_an_image_whose_record_is_not_of_its_files_kind_is_refused() -> None:
    image = demo_image("iep")
    image["app"]["goods"]["files"][1]["data"] = {"1": ticket().hex()}   # a ticket as a coupon
    with pytest.raises(ImageError, match=r"card\.json"):
        card_from_image(image, source="card.json")


def profile(tmp_path: Path, goods: str) -> Path:
    text = (FIXTURES / "iep-demo.toml").read_text()
    path = tmp_path / "iep.toml"
    for name in ("demo-issuer.toml",):
        if (FIXTURES / name).exists():
            (tmp_path / name).write_text((FIXTURES / name).read_text())
    # a [[goods]] table goes at the end; a plain key (goods = []) before the first table
    path.write_text(text + "\n" + goods if goods.startswith("[[") else goods + text)
    return path


def test_the_profile_declares_the_goods_files(tmp_path: Path) -> None:
    image = image_from_profile(profile(tmp_path, '[[goods]]\nsfi = 0x1A\nkind = "transit"\n'
                                                  'records = 3\n'))
    files = image["app"]["goods"]["files"]
    assert files == [{"sfi": 0x1A, "kind": "transit", "record_length": 40, "records": 3,
                      "data": {}}]
    card = card_from_image(image)
    host = RawHost(card)
    host.select()
    assert host.send(bytes([0x00, 0xB2, 3, 0x1A << 3 | 4, 40])) == (G.EMPTY, 0x9000)
    assert host.sw(bytes([0x00, 0xB2, 4, 0x1A << 3 | 4, 40])) == 0x6A83
    assert host.sw(bytes([0x00, 0xB2, 1, 0x11 << 3 | 4, 40])) == 0x6A82
    assert host.sw(bytes([0x00, 0xB2, 1, 0x1A << 3 | 4, 20])) == 0x6C28
    none = image_from_profile(profile(tmp_path, "goods = []\n"))
    assert none["app"]["goods"] == {"files": []}


@pytest.mark.parametrize(("goods", "message"), [
    ('[[goods]]\nsfi = 0x18\nkind = "ticket"\n', "goods[0].sfi: 18 is a purse file"),
    ('[[goods]]\nsfi = 0x11\nkind = "ticket"\n[[goods]]\nsfi = 0x11\nkind = "coupon"\n',
     "goods[1].sfi: 11 is given twice"),
    ('[[goods]]\nsfi = 0x11\nkind = "gift"\n', "goods[0].kind"),
    ('[[goods]]\nsfi = 0x11\nkind = "ticket"\nrecords = 255\n', "goods[0].records"),
])
def test_a_bad_goods_profile_is_named(tmp_path: Path, goods: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        image_from_profile(profile(tmp_path, goods))
