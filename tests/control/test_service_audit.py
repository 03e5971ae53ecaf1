"""Every change a service makes commits together with its audit row, or not
at all: an audit log that fails right after writing its row must leave
neither the row nor the change behind."""

from __future__ import annotations

import copy
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from control.domain.project import ProjectSettings
from control.secrets import SecretBox, key_id
from control.storage.accounts import Principal
from control.storage.audit import AuditLog
from control.storage.db import Conn
from control.storage.env import EnvStore
from tests.helpers import Api, ControlHandle

INTERNAL = Principal("internal", None, None, "conveyor", frozenset({"system"}))
S = TypeVar("S")


class AfterAudit(Exception):
    """Raised by ``FailingAudit`` once its row is written."""


class FailingAudit(AuditLog):
    """Writes the row as the real log does, then fails: whatever the service
    did before must roll back with the row."""

    async def record(
        self,
        conn: Conn | None,
        account_id: str | None,
        actor: str,
        action: str,
        target: str,
        details: str = "",
    ) -> None:
        await super().record(conn, account_id, actor, action, target, details)
        raise AfterAudit(action)


def failing(service: S, control: ControlHandle) -> S:
    """A copy of ``service`` whose audit log fails after writing."""
    out = copy.copy(service)
    out.audit = FailingAudit(control.plane.db)  # type: ignore[attr-defined]
    return out


async def one(control: ControlHandle, sql: str, *params: Any) -> Any:
    async with control.plane.db.connection() as conn:
        cur = await conn.execute(sql, params)
        row = await cur.fetchone()
    assert row is not None
    return row[0]


async def audited(control: ControlHandle, action: str) -> int:
    return int(await one(control, "SELECT count(*) FROM audit_log WHERE action = %s", action))


async def leaves_nothing(
    control: ControlHandle, action: str, change: Callable[[], Awaitable[object]]
) -> None:
    """Run ``change`` with a failing audit log: it raises ``AfterAudit`` and
    no row of ``action`` is left. The caller then checks the change itself
    was rolled back."""
    before = await audited(control, action)
    with pytest.raises(AfterAudit):
        await change()
    assert await audited(control, action) == before


@pytest.fixture
async def me(control: ControlHandle) -> Principal:
    found = await control.plane.accounts.authenticate(control.admin_token)
    assert found is not None
    return found


async def test_project_changes_commit_with_their_audit_row(
    control: ControlHandle, api: Api, repo: Path, me: Principal
) -> None:
    await api.create_project("web", repo)
    svc = failing(control.plane.services.projects, control)
    real = control.plane.services.projects
    before = await real.get(me, "web")

    settings = ProjectSettings(name="other", repo_url=str(repo), build_command="true")
    await leaves_nothing(control, "project.create", lambda: svc.create(me, settings))
    assert [p.name for p in await real.list_projects(me)] == ["web"]

    await leaves_nothing(
        control, "project.update", lambda: svc.update(me, "web", {"build_command": "make"})
    )
    await leaves_nothing(control, "project.rotate_webhook_secret",
                         lambda: svc.rotate_webhook_secret(me, "web"))  # fmt: skip
    await leaves_nothing(control, "cache.purge", lambda: svc.purge_cache(me, "web"))
    await leaves_nothing(control, "project.delete", lambda: svc.delete(me, "web"))
    after = await real.get(me, "web")
    assert after.build_command == before.build_command
    assert after.webhook_secret == before.webhook_secret
    assert after.cache_generation == before.cache_generation
    assert after.updated_at == before.updated_at

    # The same calls with the real log write the change and one row each.
    await real.update(me, "web", {"build_command": "make"})
    assert (await real.get(me, "web")).build_command == "make"
    assert await audited(control, "project.update") == 1


async def test_variable_changes_commit_with_their_audit_row(
    control: ControlHandle, api: Api, repo: Path, me: Principal
) -> None:
    await api.create_project("web", repo)
    real = control.plane.services.env
    svc = failing(real, control)
    await real.set(me, "web", "KEEP", "1", secret=False)

    await leaves_nothing(control, "env.set", lambda: svc.set(me, "web", "NEW", "2", secret=False))
    await leaves_nothing(control, "secret.set",
                         lambda: svc.set(me, "web", "TOKEN", "s3", secret=True))  # fmt: skip
    await leaves_nothing(control, "env.unset", lambda: svc.unset(me, "web", "KEEP"))
    names = [v.name for v in await control.plane.services.projects.env(me, "web")]
    assert names == ["KEEP"]


async def test_key_rotation_commits_with_its_audit_row(
    control: ControlHandle, api: Api, repo: Path, me: Principal
) -> None:
    project = await api.create_project("web", repo)
    await control.plane.services.env.set(me, "web", "TOKEN", "s3", secret=True)
    old = key_id(control.secret_key)
    # A new key in front: the stored secret is now under an older one.
    rotated = EnvStore(control.plane.db, SecretBox((os.urandom(32), control.secret_key)))
    svc = failing(control.plane.services.env, control)
    svc.env = rotated

    await leaves_nothing(control, "secrets.rotate", lambda: svc.rotate_keys(INTERNAL))
    sql = "SELECT key_id FROM project_env WHERE project_id = %s AND name = 'TOKEN'"
    assert await one(control, sql, project.id) == old

    svc.audit = control.plane.audit
    done = await svc.rotate_keys(INTERNAL)
    assert (done.reencrypted, done.key_id) == (1, rotated.box.current)
    assert await one(control, sql, project.id) == rotated.box.current
    assert await audited(control, "secrets.rotate") == 1


async def test_token_and_account_changes_commit_with_their_audit_row(
    control: ControlHandle, me: Principal
) -> None:
    tokens = control.plane.services.tokens
    kept, _ = await tokens.create(me, "kept", ("read",))
    svc = failing(tokens, control)
    await leaves_nothing(control, "token.create", lambda: svc.create(me, "lost", ("write",)))
    await leaves_nothing(control, "token.revoke", lambda: svc.revoke(me, kept.id))
    listed = {t.name: t for t in await tokens.list(me)}
    assert "lost" not in listed
    assert listed["kept"].revoked_at is None

    accounts = failing(control.plane.services.accounts, control)
    await leaves_nothing(control, "account.create", lambda: accounts.create(INTERNAL, "acme"))
    assert await one(control, "SELECT count(*) FROM accounts WHERE name = 'acme'") == 0


async def test_hook_changes_commit_with_their_audit_row(
    control: ControlHandle, api: Api, repo: Path, me: Principal
) -> None:
    await api.create_project("web", repo)
    hooks = control.plane.services.hooks
    kept, _ = await hooks.create(me, "web", "kept")
    svc = failing(hooks, control)
    await leaves_nothing(control, "hook.create", lambda: svc.create(me, "web", "lost"))
    await leaves_nothing(control, "hook.revoke", lambda: svc.revoke(me, "web", kept.id))
    listed = {h.name: h for h in await hooks.list(me, "web")}
    assert list(listed) == ["kept"]
    assert listed["kept"].revoked_at is None
