"""H1, F1 and file modes (issue 9): bounded bodies and JSON, a full disk answered 503, private
database files. Real servers on loopback, real SQLite, a real full disk (a small tmpfs)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_attack_bank import SECRET, Bank, order, start_bank

from svcard.host.kit.db import make_engine
from svcard.host.kit.http import (
    MAX_BODY,
    MAX_JSON_BODY,
    STORAGE_ERROR_HANDLERS,
    Refused,
    answer,
    check_json_shape,
)
from svcard.host.kit.serving import ServerThread
from svcard.protocols import messages as M


@pytest.fixture
def bank(tmp_path: Path) -> Iterator[Bank]:
    b = start_bank(f"sqlite:///{tmp_path / 'bank.db'}")
    b.server.db.create_account("alice", "Alice", 156, 10_000, SECRET)
    yield b
    b.thread.stop()


def post_raw(http: httpx.Client, url: str, body: bytes | Iterator[bytes],
             **headers: str) -> httpx.Response:
    return http.post(url, content=body, headers={"content-type": "application/json", **headers})


# --- H1: bounded JSON and bodies -----------------------------------------------------------

@pytest.mark.parametrize("shape", ["arrays", "objects", "mixed", "unclosed"])
def test_deeply_nested_json_is_a_clear_400_not_a_500(bank: Bank, http: httpx.Client,
                                                     shape: str) -> None:
    depth = 100_000 if shape != "objects" else 1_500  # within the body limit
    if shape == "arrays":
        body = "[" * depth + "]" * depth
    elif shape == "objects":
        body = '{"a":' * depth + "1" + "}" * depth
    elif shape == "mixed":
        body = '[{"k":' * (depth // 8) + "0" + "}]" * (depth // 8)
    else:
        body = "[" * depth
    body = body.encode()[:MAX_JSON_BODY]
    answer_ = post_raw(http, bank.start_url, body)
    assert answer_.status_code == 400, answer_.text
    assert "nested deeper" in answer_.json()["reason"]
    assert bank.balance("alice") == 10_000


def test_brackets_inside_strings_do_not_count(bank: Bank, http: httpx.Client) -> None:
    tricky = order("alice", 'x\\"' + "[" * 100 + '"{{{')
    answer_ = http.post(bank.start_url, json=tricky)
    assert answer_.status_code == 403  # parsed fine, then the wrong secret
    tricky = order("alice", SECRET)
    tricky["note"] = "]" * 1000 + "[" * 1000
    assert http.post(bank.start_url, json=tricky).status_code == 200


def test_json_with_too_many_items_is_refused(bank: Bank, http: httpx.Client) -> None:
    flood = order("alice", SECRET)
    flood["padding"] = list(range(2_000))
    answer_ = http.post(bank.start_url, json=flood)
    assert answer_.status_code == 400 and "items" in answer_.json()["reason"]
    assert bank.balance("alice") == 10_000


def test_oversized_bodies_are_413_declared_or_streamed(bank: Bank, http: httpx.Client) -> None:
    big = json.dumps({**order("alice", SECRET), "pad": "x" * (MAX_JSON_BODY + 1)}).encode()
    answer_ = post_raw(http, bank.start_url, big)
    assert answer_.status_code == 413 and "at most" in answer_.json()["reason"]

    def stream() -> Iterator[bytes]:  # chunked: no Content-Length to refuse up front
        yield b'{"account": "alice", "pad": "'
        for _ in range(1_000):
            yield b"y" * 1_000
        yield b'"}'

    answer_ = post_raw(http, bank.start_url, stream())
    assert answer_.status_code == 413
    status = http.post(f"{bank.thread.url}/v1/load/status/{'00' * 16}",
                       content=b"\0" * (MAX_BODY + 1))
    assert status.status_code in (404, 413)  # no such load is found first, or the size
    assert bank.balance("alice") == 10_000


@pytest.mark.parametrize("text", [
    b"", b"[", b"]]]]", b'"', b'"\\', b'["\\"]', b"[" * 8, b"{" * 9, b'"' + b"[" * 50,
    b'["a\\\\"' + b"[" * 20, b"[1,2,3]" * 10,
])
def test_the_shape_check_never_lets_json_recurse(text: bytes) -> None:
    try:
        check_json_shape(text)
    except Refused as exc:
        assert exc.status == 400
        return
    with contextlib.suppress(ValueError):
        json.loads(text)  # never RecursionError: the check let only shallow text through


def test_shape_check_counts_depth_exactly() -> None:
    check_json_shape(b"[" * 8 + b"]" * 8)
    with pytest.raises(Refused, match="deeper than 8"):
        check_json_shape(b"[" * 9 + b"]" * 9)
    check_json_shape(b'["' + b"[" * 100 + b'"]')   # inside a string
    with pytest.raises(Refused, match="deeper"):
        check_json_shape(b'["\\\\"' + b"[" * 20)  # an escaped backslash ends the string


# --- F1: a full disk -----------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Fill the disk to the last byte; the file returned frees it again."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return filler


def test_bank_on_a_full_disk_answers_503_with_a_reason_and_changes_nothing(
        small_disk: Path, http: httpx.Client) -> None:
    bank = start_bank(f"sqlite:///{small_disk / 'bank.db'}")
    try:
        bank.server.db.create_account("alice", "Alice", 156, 10_000, SECRET)
        assert http.post(bank.start_url, json=order("alice", SECRET)).status_code == 200
        filler = fill(small_disk)
        codes = []
        for n in range(30):  # a busy client goes on: every answer is a clear 503
            answer_ = http.post(bank.start_url, json=order("alice", SECRET, amount=100 + n))
            codes.append(answer_.status_code)
            if answer_.status_code == 503:
                assert answer_.json()["reason"] == "the database's disk is full; try again later"
                assert answer_.headers["Retry-After"] == "30"
        assert set(codes) == {503}, codes
        filler.unlink()
        assert bank.balance("alice") == 9_999  # nothing of the 30 was debited
        assert http.post(bank.start_url, json=order("alice", SECRET)).status_code == 200
        assert bank.balance("alice") == 9_998
        assert len(bank.server.db.loads()) == 2
    finally:
        bank.thread.stop()


def _binary_app(db_url: str) -> tuple[Starlette, Table, Any]:
    """A server like the payment and load servers: binary endpoints through ``answer()``,
    and one plain endpoint relying on STORAGE_ERROR_HANDLERS."""
    meta = MetaData()
    table = Table("things", meta, Column("id", Integer, primary_key=True),
                  Column("data", String(10_000)))
    engine = make_engine(db_url, meta)

    async def write(body: bytes) -> Response:
        with engine.begin() as conn:
            conn.execute(insert(table).values(data=body.hex()))
        return Response(b"ok")

    async def via_answer(request: Request) -> Response:
        return await answer(write, request)

    async def plain(request: Request) -> Response:
        return await write(await request.body())

    app = Starlette(routes=[Route("/answer", via_answer, methods=["POST"]),
                            Route("/plain", plain, methods=["POST"])],
                    exception_handlers=dict(STORAGE_ERROR_HANDLERS))
    return app, table, engine


def test_answer_and_the_handlers_turn_a_full_disk_into_503(small_disk: Path,
                                                           http: httpx.Client) -> None:
    app, table, engine = _binary_app(f"sqlite:///{small_disk / 'things.db'}")
    with ServerThread(app) as server:
        assert http.post(f"{server.url}/answer", content=b"a" * 100).status_code == 200
        filler = fill(small_disk)
        for path in ("/answer", "/plain"):
            got = http.post(f"{server.url}{path}", content=os.urandom(4_000))
            assert got.status_code == 503, (path, got.text)
            assert got.headers["X-Svcard-Reason"] == \
                "the database's disk is full; try again later"
            assert got.headers["Retry-After"] == "30"
            assert got.headers["content-type"] == "application/octet-stream"
            assert M.parse(M.ErrorMessage, got.content, "error").code == 503
        filler.unlink()
        assert http.post(f"{server.url}/answer", content=b"b").status_code == 200
        too_big = http.post(f"{server.url}/answer", content=b"x" * (MAX_BODY + 1))
        assert too_big.status_code == 413
    with engine.connect() as conn:
        assert len(conn.execute(select(table)).all()) == 2
    engine.dispose()


# --- database files are private --------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_files_are_created_0600_even_with_a_loose_umask(tmp_path: Path) -> None:
    meta = MetaData()
    table = Table("t", meta, Column("id", Integer, primary_key=True))
    old = os.umask(0)
    try:
        engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}", meta)
        with engine.begin() as conn:
            conn.execute(insert(table).values(id=1))
        conn2 = engine.connect()  # keep the WAL and SHM files while we look
        try:
            for name in ("new.db", "new.db-wal", "new.db-shm"):
                assert (tmp_path / name).exists(), name
                assert mode(tmp_path / name) == 0o600, name
        finally:
            conn2.close()
            engine.dispose()
    finally:
        os.umask(old)


def test_an_existing_loose_database_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    meta = MetaData()
    Table("t", meta, Column("id", Integer, primary_key=True))
    make_engine(f"sqlite:///{path}", meta).dispose()
    os.chmod(path, 0o644)
    make_engine(f"sqlite:///{path}", meta).dispose()
    assert mode(path) == 0o600


def test_bank_database_is_private(bank: Bank, tmp_path: Path) -> None:
    assert mode(tmp_path / "bank.db") == 0o600
