"""A project's variables and secrets as a caller changes them, and the
re-encryption of every secret under the current key. Each change is one
transaction with its audit row; reading the variables is
``ProjectService.env``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from control.domain.env import validate_var
from control.services.access import check, require
from control.storage.accounts import Principal
from control.storage.audit import AuditLog
from control.storage.db import Database
from control.storage.env import EnvStore, EnvVar
from control.storage.projects import ProjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rotation:
    """What a key rotation did: how many secrets it re-encrypted, and the
    id of the key they are now under."""

    reencrypted: int
    key_id: str


class EnvService:
    """Raises ``NotFound`` for a project that is missing or another
    account's, ``PermissionDenied`` for a missing scope,
    ``InvalidArgument`` naming a wrong name or value, and
    ``FailedPrecondition`` past the per-project count or, for a secret,
    without a secret key."""

    def __init__(
        self, db: Database, projects: ProjectStore, env: EnvStore, audit: AuditLog
    ) -> None:
        self.db = db
        self.projects = projects
        self.env = env
        self.audit = audit

    async def set(
        self, caller: Principal, ref: str, name: str, value: str, *, secret: bool
    ) -> EnvVar:
        """Insert or replace variable ``name`` of project ``ref``; a secret
        is stored encrypted and answered blank."""
        account = require(caller, "write")
        validate_var(name, value)
        async with self.db.transaction() as conn:
            project = await self.projects.get_in(conn, account, ref)
            var = await self.env.set(conn, project.id, name, value, secret)
            await self.audit.record(
                conn, account, caller.name, "secret.set" if secret else "env.set",
                f"project {project.name}", f"name={name}",
            )  # fmt: skip
        return var

    async def unset(self, caller: Principal, ref: str, name: str) -> None:
        """Remove variable ``name`` of project ``ref``; ``NotFound`` when it
        has none of that name."""
        account = require(caller, "write")
        async with self.db.transaction() as conn:
            project = await self.projects.get_in(conn, account, ref)
            await self.env.unset(conn, project.id, name)
            await self.audit.record(
                conn, account, caller.name, "env.unset", f"project {project.name}",
                f"name={name}",
            )  # fmt: skip

    async def rotate_keys(self, caller: Principal) -> Rotation:
        """Re-encrypt every account's secrets that are not under the current
        key (the "system" scope: this spans accounts). Run it after adding a
        key in front of ``CONVEYOR_SECRET_KEYS``; the old key can go once
        this answers."""
        check(caller, "system")
        key_id = self.env.box.current
        async with self.db.transaction() as conn:
            count = await self.env.rotate(conn)
            await self.audit.record(
                conn, caller.account_id, caller.name, "secrets.rotate", f"key {key_id}",
                f"reencrypted={count}",
            )  # fmt: skip
        log.info("re-encrypted %d secrets under key %s", count, key_id)
        return Rotation(count, key_id)
