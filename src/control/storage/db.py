"""The connection pool and the psycopg-error translation every store uses."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.abc import Params, QueryNoTemplate
from psycopg.rows import TupleRow, scalar_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from control.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[TupleRow]
# Seconds a pooled connection may sit idle before it is checked on checkout.
CHECK_AFTER_IDLE = 5.0
# Seconds a request waits for a connection at most (the pool is busy).
WAIT = 10.0
# While the database is known to be down, a request waits this long for a
# connection (the pool's attempt to reconnect, or one coming back) before it
# fails with Unavailable: fast enough for any sensible call deadline.
WAIT_WHILE_DOWN = 0.25
# A request's wait is cut in slices this long, after each of which it looks
# whether the pool found the database down meanwhile.
WAIT_SLICE = 0.5
# How long the pool keeps retrying one connection with its backoff (1 s,
# doubling) before it gives up and lets the next waiting request try at
# once: bounds how late the pool notices that the database came back.
RECONNECT_GIVE_UP = 4.0
# What an HTTP answer of 503 tells a client to wait before it retries (s).
RETRY_AFTER = 5
Row = tuple[Any, ...]


class Database:
    """Owns the pool. Callers take connections with ``connection()`` or run
    work in one transaction with ``transaction()``; both translate psycopg
    errors into the control plane's error tree.

    It knows when the database is down (a connection broke, a check or a
    connection attempt failed) until a connection works again; meanwhile
    requests fail fast with ``Unavailable`` instead of waiting ``WAIT``.
    """

    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 16) -> None:
        self.url = url
        self.pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True},
            open=False,
            # Bounded: a request never waits forever for a connection.
            timeout=WAIT,
            # A server restart leaves dead connections in the pool: check a
            # connection that sat idle before handing it out. One returned
            # moments ago was just used successfully, and checking it would
            # add a round trip to every transaction.
            check=self._check_if_idle,
            reset=self._returned,
            configure=self._connected,
            reconnect_timeout=RECONNECT_GIVE_UP,
            name="conveyor",
        )
        self._returned_at: dict[int, float] = {}
        # monotonic() when the database was found down; None while it is up.
        self.down_since: float | None = None
        self._connect_errors = 0

    def _mark_down(self, why: object) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("database down: %s; requests fail fast until it answers", why)

    def _mark_up(self) -> None:
        if self.down_since is not None:
            log.info("database answering again after %.1f s", time.monotonic() - self.down_since)
            self.down_since = None
        self._connect_errors = self._errors()

    def _errors(self) -> int:
        return int(self.pool.get_stats().get("connections_errors", 0))

    async def _connected(self, conn: Conn) -> None:
        self._mark_up()

    async def _returned(self, conn: Conn) -> None:
        self._returned_at[id(conn)] = time.monotonic()

    async def _check_if_idle(self, conn: Conn) -> None:
        returned = self._returned_at.get(id(conn))
        if returned is not None and time.monotonic() - returned < CHECK_AFTER_IDLE:
            return
        try:
            await AsyncConnectionPool.check_connection(conn)
        except psycopg.OperationalError as exc:
            self._mark_down(exc)
            raise
        if self.down_since is not None:
            self._mark_up()

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=30.0)

    async def close(self) -> None:
        await self.pool.close(timeout=5.0)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        async with translated(), self._checked_out() as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with translated(), self._checked_out() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def _checked_out(self) -> AsyncIterator[Conn]:
        conn = await self._getconn()
        try:
            yield conn
        except psycopg.OperationalError as exc:
            if conn.broken:
                self._mark_down(exc)
            raise
        else:
            if self.down_since is not None:
                self._mark_up()
        finally:
            await self.pool.putconn(conn)

    async def _getconn(self) -> Conn:
        """A connection within ``WAIT`` seconds, or within ``WAIT_WHILE_DOWN``
        once the database is known to be down. Raises ``Unavailable``."""
        deadline = time.monotonic() + WAIT
        while True:
            down = self.down_since is not None
            wait = WAIT_WHILE_DOWN if down else min(WAIT_SLICE, deadline - time.monotonic())
            try:
                conn = await self.pool.getconn(timeout=max(wait, 0.0))
            except PoolTimeout:
                if not down and self._errors() > self._connect_errors:
                    self._mark_down("the pool cannot connect")
                    down = True
                if down:
                    raise Unavailable("the database is not reachable; retry shortly") from None
                if time.monotonic() >= deadline:
                    raise Unavailable("the database is busy; retry shortly") from None
                continue
            return conn

    def stats(self) -> dict[str, int]:
        return self.pool.get_stats()


async def fetch_value(conn: Conn, query: QueryNoTemplate, params: Params | None = None) -> Any:
    """The first column of the first row ``query`` returns; None when it
    returns no row (or a NULL). For a query of one value: a count, an
    EXISTS, one column of one row."""
    cur = conn.cursor(row_factory=scalar_row)
    await cur.execute(query, params)
    return await cur.fetchone()


async def fetch_column(
    conn: Conn, query: QueryNoTemplate, params: Params | None = None
) -> list[Any]:
    """The first column of every row ``query`` returns, in order."""
    cur = conn.cursor(row_factory=scalar_row)
    await cur.execute(query, params)
    return await cur.fetchall()


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn psycopg errors that reach a client into the error tree."""
    try:
        yield
    except pg_errors.UniqueViolation as exc:
        raise AlreadyExists(_constraint_message(exc)) from exc
    except pg_errors.ForeignKeyViolation as exc:
        raise NotFound("a referenced object does not exist") from exc
    except (pg_errors.InvalidTextRepresentation, pg_errors.StringDataRightTruncation) as exc:
        raise InvalidArgument("request", "a value has the wrong form") from exc
    except (psycopg.OperationalError, pg_errors.AdminShutdown) as exc:
        log.warning("database unavailable: %s", exc)
        raise Unavailable("the database is not reachable; retry shortly") from exc
    except TimeoutError as exc:
        raise Unavailable("the database is busy; retry shortly") from exc


def _constraint_message(exc: pg_errors.UniqueViolation) -> str:
    name = exc.diag.constraint_name or ""
    if name == "projects_account_id_name_key":
        return "a project with that name already exists"
    return "it already exists"
