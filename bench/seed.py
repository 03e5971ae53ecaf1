"""Accounts, projects and queued builds written straight into Conveyor's
database, for the parts that need more than the API offers in reasonable
time (100 accounts, 10,000 queued builds, a raised concurrency limit).

The rows are the ones ``Lifecycle.queue`` writes (a queued build and its
pending steps), and the transaction ends with the same
``NOTIFY conveyor_queue`` that wakes the scheduler, so the control plane sees
them exactly as if webhooks had queued them. The schema is the one of the
migrations in src/control/storage/migrations.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

COMMIT = "b" * 40


@dataclass(frozen=True)
class Account:
    id: str
    project_id: str


async def accounts(
    conn: psycopg.AsyncConnection[Any], names: list[str], limit: int
) -> list[Account]:
    """Create one account per name, with ``limit`` concurrent builds and one
    project building `true`."""
    made = []
    async with conn.transaction():
        for name in names:
            account = Account(str(uuid.uuid4()), str(uuid.uuid4()))
            await conn.execute(
                "INSERT INTO accounts (id, name, concurrency_limit) VALUES (%s, %s, %s)",
                (account.id, name, limit),
            )
            await conn.execute(
                "INSERT INTO projects (id, account_id, name, repo_url, production_branch,"
                " build_command, webhook_secret, run_timeout_seconds)"
                " VALUES (%s, %s, 'app', '/nonexistent', 'main', 'true', %s, 1200)",
                (account.project_id, account.id, secrets.token_hex(16)),
            )
            made.append(account)
    return made


async def queue(
    conn: psycopg.AsyncConnection[Any], per_account: list[tuple[Account, int]]
) -> tuple[list[str], float]:
    """Queue ``n`` builds for each (account, n), each on its own branch, in
    one transaction that ends with NOTIFY; return (build ids, commit time)."""
    ids: list[str] = []
    async with conn.transaction():
        async with conn.cursor().copy(
            "COPY builds (id, project_id, account_id, branch, commit_sha, status, trigger,"
            " production) FROM STDIN"
        ) as copy:
            for account, n in per_account:
                for i in range(n):
                    build_id = str(uuid.uuid4())
                    ids.append(build_id)
                    await copy.write_row(
                        (build_id, account.project_id, account.id, f"b{i}", COMMIT, "queued",
                         "push", False)
                    )  # fmt: skip
        async with conn.cursor().copy("COPY build_steps (build_id, idx, name) FROM STDIN") as copy:
            for build_id in ids:
                await copy.write_row((build_id, 0, "clone"))
                await copy.write_row((build_id, 1, "build"))
        await conn.execute("SELECT pg_notify('conveyor_queue', '')")
    return ids, time.time()
