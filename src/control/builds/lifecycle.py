"""The build lifecycle: the parts that own build state, put together.

Each part lives in its own module of ``builds/`` and changes a build's
status only through ``Transitions.move`` (see ``transitions.py``):

- ``transitions``: the one write, events after commit, reports, cancel;
- ``queueing``: a new build, superseding the branch's older ones;
- ``placement``: queued builds onto runners' free slots;
- ``dispatch``: what a runner's stream sends, and builds handed back;
- ``alarms``: startup, run and kill deadlines (``deadlines``: their reasons);
- ``lost_runners``: silent runners and runners that come back.

``Lifecycle`` is what the servicers, webhooks and the scheduler hold; its
methods are the parts' entry points under the names callers use.
"""

from __future__ import annotations

from collections.abc import Callable

from control.builds.alarms import Alarms
from control.builds.dispatch import AssignmentData, Dispatch, Stop, step_plan
from control.builds.lost_runners import LostRunners
from control.builds.placement import Placement
from control.builds.queueing import Queueing
from control.builds.transitions import StepReport, Transitions, now
from control.config import LifecycleSettings
from control.metrics import ControlMetrics
from control.storage.assignments import AssignmentStore
from control.storage.builds import BuildStore
from control.storage.db import Database
from control.storage.env import EnvStore
from control.storage.notify import Notifier
from control.storage.projects import ProjectStore
from control.storage.runners import RunnerStore

__all__ = ["AssignmentData", "Lifecycle", "StepReport", "Stop", "now", "step_plan"]


class Lifecycle:
    def __init__(
        self,
        db: Database,
        builds: BuildStore,
        projects: ProjectStore,
        runners: RunnerStore,
        notifier: Notifier,
        metrics: ControlMetrics,
        settings: LifecycleSettings,
        env: EnvStore,
        *,
        local_repositories: bool,
    ) -> None:
        self.db = db
        self.builds = builds
        self.projects = projects
        self.runners = runners
        self.env = env
        self.settings = settings
        self.transitions = Transitions(db, builds, AssignmentStore(), notifier, metrics, settings)
        self.queueing = Queueing(self.transitions, local_repositories=local_repositories)
        self.placement = Placement(self.transitions, runners, settings)
        self.dispatcher = Dispatch(self.transitions, projects, runners, env, settings)
        self.alarms = Alarms(self.transitions, metrics)
        self.lost_runners = LostRunners(self.transitions, runners, metrics, settings)
        # The parts' entry points under the names callers use (bound
        # methods: one signature each, in its part).
        self.listeners: list[Callable[[str], None]] = self.transitions.listeners
        self.transaction = self.transitions.transaction
        self.queue = self.queueing.queue
        self.start = self.placement.place_one
        self.start_many = self.placement.place
        self.dispatch = self.dispatcher.take
        self.refused = self.dispatcher.refused
        self.report = self.transitions.report
        self.warn = self.transitions.warn
        self.cancel = self.transitions.cancel
        self.fire_alarms = self.alarms.fire
        self.reap_lost_runners = self.lost_runners.reap
        self.forget_missing = self.lost_runners.forget_missing
