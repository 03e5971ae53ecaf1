"""The connection pool and the psycopg-error translation every store uses."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from control.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[TupleRow]
# Seconds a pooled connection may sit idle before it is checked on checkout.
CHECK_AFTER_IDLE = 5.0
Row = tuple[Any, ...]


class Database:
    """Owns the pool. Callers take connections with ``connection()`` or run
    work in one transaction with ``transaction()``; both translate psycopg
    errors into the control plane's error tree."""

    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 16) -> None:
        self.url = url
        self.pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True},
            open=False,
            # Bounded: a request never waits forever for a connection.
            timeout=10.0,
            # A server restart leaves dead connections in the pool: check a
            # connection that sat idle before handing it out. One returned
            # moments ago was just used successfully, and checking it would
            # add a round trip to every transaction.
            check=self._check_if_idle,
            reset=self._returned,
            name="conveyor",
        )
        self._returned_at: dict[int, float] = {}

    async def _returned(self, conn: Conn) -> None:
        self._returned_at[id(conn)] = time.monotonic()

    async def _check_if_idle(self, conn: Conn) -> None:
        returned = self._returned_at.get(id(conn))
        if returned is not None and time.monotonic() - returned < CHECK_AFTER_IDLE:
            return
        await AsyncConnectionPool.check_connection(conn)

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=30.0)

    async def close(self) -> None:
        await self.pool.close(timeout=5.0)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        async with translated(), self.pool.connection() as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with translated(), self.pool.connection() as conn, conn.transaction():
            yield conn

    def stats(self) -> dict[str, int]:
        return self.pool.get_stats()


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
