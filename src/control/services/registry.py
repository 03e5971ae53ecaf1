"""The services bundle the composition root builds and every edge shares."""

from __future__ import annotations

from dataclasses import dataclass

from control.services.builds import BuildService
from control.services.projects import ProjectService
from control.services.runners import RunnerService


@dataclass(frozen=True)
class Services:
    """One instance of each service; edges receive this, never stores."""

    builds: BuildService
    projects: ProjectService
    runners: RunnerService
