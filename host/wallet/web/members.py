"""The web server's database: members (seed 003 FIG. 1 step a1, FIG. 2), their sessions and the
login throttle. SQLite by default, PostgreSQL by URL.

* ``wm_members``: member id and the password's argon2id hash (never the password).
* ``wm_sessions``: a session by the SHA-256 of its cookie token (the token itself is only in
  the browser), its member and expiry.
* ``wm_throttle``: failed logins counted per member and per address in a window; taking an
  attempt is ONE step (checked and counted together), so parallel guesses cannot pass the limit.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from ...kit.db import now_ms, reading, step
from ...kit.schema import Schema, open_schema
from ..links import token, token_digest

metadata = MetaData()

members = Table(
    "wm_members", metadata,
    Column("member", String(40), primary_key=True),
    Column("password_hash", String(200), nullable=False),
    Column("created", BigInteger, nullable=False),
)

sessions = Table(
    "wm_sessions", metadata,
    Column("token_digest", String(64), primary_key=True),
    Column("member", String(40), nullable=False),
    Column("expires", BigInteger, nullable=False),
)

throttle = Table(
    "wm_throttle", metadata,
    Column("key", String(80), primary_key=True),
    Column("window_start", BigInteger, nullable=False),
    Column("failures", Integer, nullable=False),
)

SCHEMA = Schema("wallet-web", 1, metadata)


def make_engine(url: str) -> Engine:
    return open_schema(url, SCHEMA)


def register(engine: Engine, member: str, password_hash: str) -> bool:
    """False if the member id is taken."""
    try:
        with step(engine) as conn:
            conn.execute(insert(members).values(member=member, password_hash=password_hash,
                                                created=now_ms()))
    except IntegrityError:
        return False
    return True


def password_hash(engine: Engine, member: str) -> str | None:
    with reading(engine) as conn:
        found = conn.execute(select(members.c.password_hash).where(
            members.c.member == member)).scalar()
    return None if found is None else str(found)


def take_attempts(engine: Engine, keys: list[str], limit: int, window_ms: int, now: int) -> bool:
    """Count one attempt against each key, in one step; False (nothing counted) when any key
    has had ``limit`` attempts in its current window. Two first attempts at once (PostgreSQL:
    both insert the key's row) are taken one after the other."""
    try:
        return _take(engine, keys, limit, window_ms, now)
    except IntegrityError:
        return _take(engine, keys, limit, window_ms, now)


def _take(engine: Engine, keys: list[str], limit: int, window_ms: int, now: int) -> bool:
    t = throttle.c
    with step(engine) as conn:
        rows = {r.key: r for r in conn.execute(select(throttle).where(
            t.key.in_(keys)).with_for_update()).all()}
        for key in keys:
            row = rows.get(key)
            if row is not None and row.window_start + window_ms > now and row.failures >= limit:
                return False
        for key in keys:
            row = rows.get(key)
            if row is None:
                conn.execute(insert(throttle).values(key=key, window_start=now, failures=1))
            elif row.window_start + window_ms <= now:
                conn.execute(update(throttle).where(t.key == key).values(
                    window_start=now, failures=1))
            else:
                conn.execute(update(throttle).where(t.key == key).values(
                    failures=t.failures + 1))
    return True


def give_back(engine: Engine, keys: list[str]) -> None:
    """A login that succeeded does not count against its keys."""
    t = throttle.c
    with step(engine) as conn:
        conn.execute(update(throttle).where(t.key.in_(keys), t.failures > 0).values(
            failures=t.failures - 1))


def new_session(engine: Engine, member: str, expires: int) -> str:
    value = token()
    with step(engine) as conn:
        conn.execute(delete(sessions).where(sessions.c.expires < now_ms()))
        conn.execute(insert(sessions).values(token_digest=token_digest(value), member=member,
                                             expires=expires))
    return value


def session_member(engine: Engine, value: str, now: int) -> str | None:
    with reading(engine) as conn:
        found = conn.execute(select(sessions.c.member).where(
            sessions.c.token_digest == token_digest(value), sessions.c.expires > now)).scalar()
    return None if found is None else str(found)


def end_session(engine: Engine, value: str) -> None:
    with step(engine) as conn:
        conn.execute(delete(sessions).where(sessions.c.token_digest == token_digest(value)))
