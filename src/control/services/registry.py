"""The services bundle the composition root builds and every edge shares."""

from __future__ import annotations

from dataclasses import dataclass

from control.services.accounts import AccountService
from control.services.builds import BuildService
from control.services.env import EnvService
from control.services.hooks import HookService
from control.services.projects import ProjectService
from control.services.runners import RunnerService
from control.services.tokens import TokenService


@dataclass(frozen=True)
class Services:
    """One instance of each service; edges receive this, never stores."""

    builds: BuildService
    projects: ProjectService
    runners: RunnerService
    env: EnvService
    tokens: TokenService
    accounts: AccountService
    hooks: HookService
