"""A test host that speaks raw APDUs to an IEP and computes every MAC the plain way."""

from __future__ import annotations

from dataclasses import dataclass

from plain import demo_card_keys, plain_mac, plain_tac

DEMO_AID = bytes.fromhex("F05356434152440101")
DEMO_SERIAL = bytes.fromhex("00000000000000000001")
TID = bytes.fromhex("112233445566")
DATE = bytes.fromhex("20270314")
TIME = bytes.fromhex("150926")


def u4(v: int) -> bytes:
    return v.to_bytes(4, "big")


@dataclass
class InitPurchase:
    balance: int
    counter: int
    overdraft: int
    key_version: int
    algorithm: int
    random: bytes


@dataclass
class InitLoad:
    balance: int
    counter: int
    key_version: int
    algorithm: int
    random: bytes
    mac1: bytes


class RawHost:
    def __init__(self, card, serial: bytes = DEMO_SERIAL) -> None:
        self.card = card
        self.keys = demo_card_keys(serial)

    def send(self, apdu: bytes | str) -> tuple[bytes, int]:
        raw = bytes.fromhex(apdu) if isinstance(apdu, str) else apdu
        out = self.card.transmit(raw)
        return out[:-2], int.from_bytes(out[-2:], "big")

    def sw(self, apdu: bytes | str) -> int:
        return self.send(apdu)[1]

    def select(self) -> bytes:
        data, sw = self.send(b"\x00\xa4\x04\x00" + bytes([len(DEMO_AID)]) + DEMO_AID + b"\x00")
        assert sw == 0x9000, hex(sw)
        return data

    def verify(self, pin: str) -> int:
        body = bytes.fromhex(pin + ("F" if len(pin) % 2 else ""))
        return self.sw(b"\x00\x20\x00\x00" + bytes([len(body)]) + body)

    def balance(self, purse: int = 2) -> int:
        data, sw = self.send(bytes([0x80, 0x5C, 0x00, purse, 0x04]))
        assert sw == 0x9000, hex(sw)
        return int.from_bytes(data, "big")

    # --- purchase ------------------------------------------------------------------------
    def init_purchase_apdu(self, amount: int, tid: bytes = TID, key_index: int = 1,
                           purse: int = 2, p1: int = 1) -> bytes:
        return bytes([0x80, 0x50, p1, purse, 0x0B, key_index]) + u4(amount) + tid + b"\x0f"

    def init_purchase(self, amount: int, tid: bytes = TID, key_index: int = 1,
                      purse: int = 2, p1: int = 1) -> InitPurchase:
        data, sw = self.send(self.init_purchase_apdu(amount, tid, key_index, purse, p1))
        assert sw == 0x9000, hex(sw)
        assert len(data) == 15
        return InitPurchase(int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:6], "big"),
                            int.from_bytes(data[6:9], "big"), data[9], data[10], data[11:15])

    def purchase_session_key(self, init: InitPurchase, ttn: int, key: str = "dpk") -> bytes:
        from plain import tdes_encrypt_block
        block = init.random + init.counter.to_bytes(2, "big") + u4(ttn)[2:]
        return tdes_encrypt_block(self.keys[key], block)

    def debit_apdu(self, ttn: int, mac1: bytes, date: bytes = DATE, time: bytes = TIME) -> bytes:
        return b"\x80\x54\x01\x00\x0f" + u4(ttn) + date + time + mac1 + b"\x08"

    def purchase_mac1(self, sk: bytes, amount: int, txn_type: int = 6, tid: bytes = TID,
                      date: bytes = DATE, time: bytes = TIME) -> bytes:
        return plain_mac(sk, u4(amount) + bytes([txn_type]) + tid + date + time)

    def purchase(self, amount: int, ttn: int = 7, txn_type: int = 6, purse: int = 2,
                 p1: int = 1) -> dict[str, bytes | int]:
        init = self.init_purchase(amount, purse=purse, p1=p1)
        sk = self.purchase_session_key(init, ttn)
        mac1 = self.purchase_mac1(sk, amount, txn_type)
        data, sw = self.send(self.debit_apdu(ttn, mac1))
        assert sw == 0x9000, hex(sw)
        tac, mac2 = data[:4], data[4:]
        assert mac2 == plain_mac(sk, u4(amount))
        assert tac == plain_tac(self.keys["dtk"], u4(amount) + bytes([txn_type]) + TID + u4(ttn)
                                + DATE + TIME)
        return {"init": init, "tac": tac, "mac2": mac2, "counter": init.counter, "ttn": ttn}

    # --- load ----------------------------------------------------------------------------
    def init_load_apdu(self, amount: int, tid: bytes = TID, key_index: int = 1,
                       purse: int = 2) -> bytes:
        return bytes([0x80, 0x50, 0x00, purse, 0x0B, key_index]) + u4(amount) + tid + b"\x10"

    def init_load(self, amount: int, tid: bytes = TID, key_index: int = 1,
                  purse: int = 2) -> InitLoad:
        data, sw = self.send(self.init_load_apdu(amount, tid, key_index, purse))
        assert sw == 0x9000, hex(sw)
        assert len(data) == 16
        return InitLoad(int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:6], "big"),
                        data[6], data[7], data[8:12], data[12:16])

    def load_session_key(self, init: InitLoad) -> bytes:
        from plain import tdes_encrypt_block
        block = init.random + init.counter.to_bytes(2, "big") + b"\x80\x00"
        return tdes_encrypt_block(self.keys["dlk"], block)

    def credit_apdu(self, mac2: bytes, date: bytes = DATE, time: bytes = TIME) -> bytes:
        return b"\x80\x52\x00\x00\x0b" + date + time + mac2 + b"\x04"

    def load_mac2(self, sk: bytes, amount: int, txn_type: int = 2, tid: bytes = TID,
                  date: bytes = DATE, time: bytes = TIME) -> bytes:
        return plain_mac(sk, u4(amount) + bytes([txn_type]) + tid + date + time)

    def load(self, amount: int, purse: int = 2) -> dict[str, bytes | int]:
        txn_type = 2 if purse == 2 else 1
        init = self.init_load(amount, purse=purse)
        sk = self.load_session_key(init)
        assert init.mac1 == plain_mac(sk, u4(init.balance) + u4(amount) + bytes([txn_type])
                                      + TID)
        data, sw = self.send(self.credit_apdu(self.load_mac2(sk, amount, txn_type)))
        assert sw == 0x9000, hex(sw)
        expected_tac = plain_tac(self.keys["dtk"], u4(init.balance + amount)
                                 + init.counter.to_bytes(2, "big") + u4(amount)
                                 + bytes([txn_type]) + TID + DATE + TIME)
        assert data == expected_tac
        return {"init": init, "tac": data, "counter": init.counter}
