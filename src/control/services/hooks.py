"""A project's deploy hooks: create (the key shown once), list, revoke.
Each change is one transaction with its audit row."""

from __future__ import annotations

import builtins
import logging

from control.domain.project import validate_branch
from control.errors import InvalidArgument
from control.services.access import require
from control.storage.accounts import Principal
from control.storage.audit import AuditLog
from control.storage.db import Database
from control.storage.hooks import DeployHook, DeployHookStore
from control.storage.projects import ProjectStore

log = logging.getLogger(__name__)

MAX_HOOK_NAME = 64


class HookService:
    """Raises ``NotFound`` for a project or hook that is missing or another
    account's, ``PermissionDenied`` for a missing scope, ``InvalidArgument``
    naming the wrong field, and ``FailedPrecondition`` past
    ``storage.hooks.MAX_HOOKS_PER_PROJECT`` live hooks."""

    def __init__(
        self, db: Database, projects: ProjectStore, hooks: DeployHookStore, audit: AuditLog
    ) -> None:
        self.db = db
        self.projects = projects
        self.hooks = hooks
        self.audit = audit

    async def create(
        self, caller: Principal, ref: str, name: str, branch: str = ""
    ) -> tuple[DeployHook, str]:
        """A hook of project ``ref`` that builds ``branch`` (default: the
        production branch); returns it and its key, which is never stored
        and must be shown to the user now."""
        account = require(caller, "write")
        if not name or len(name) > MAX_HOOK_NAME or not name.isprintable():
            raise InvalidArgument("name", f"must be 1-{MAX_HOOK_NAME} printable characters")
        async with self.db.transaction() as conn:
            project = await self.projects.get_in(conn, account, ref)
            branch = branch or project.production_branch
            validate_branch("branch", branch)
            hook, key = await self.hooks.create(conn, project.id, name, branch)
            await self.audit.record(
                conn, account, caller.name, "hook.create", f"project {project.name}",
                f"id={hook.id} name={name} branch={branch}",
            )  # fmt: skip
        log.info("deploy hook %s created", hook.id, extra={"project_id": project.id})
        return hook, key

    async def list(self, caller: Principal, ref: str) -> builtins.list[DeployHook]:
        """The hooks of project ``ref``, oldest first, revoked ones included."""
        project = await self.projects.get(require(caller, "read"), ref)
        return await self.hooks.list_for(project.id)

    async def revoke(self, caller: Principal, ref: str, hook_id: str) -> DeployHook:
        """Revoke hook ``hook_id`` (its id or 6+ of its first characters) of
        project ``ref``; revoking a revoked hook answers it unchanged."""
        account = require(caller, "write")
        async with self.db.transaction() as conn:
            project = await self.projects.get_in(conn, account, ref)
            hook = await self.hooks.revoke(conn, project.id, hook_id)
            await self.audit.record(
                conn, account, caller.name, "hook.revoke", f"project {project.name}",
                f"id={hook.id} name={hook.name}",
            )  # fmt: skip
        return hook
