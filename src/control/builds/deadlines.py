"""What a build that passed its startup or run deadline is told: pure, no I/O."""

from __future__ import annotations

# An alarm pass runs every ``alarm_poll`` seconds on every replica; a
# deadline noticed later than this many polls (and at least LATE_MIN
# seconds) passed while no replica could act (the database was away).
LATE_POLLS = 5
LATE_MIN = 5.0


def run_deadline_reason(limit: int, late: float, alarm_poll: float) -> str:
    """The final reason of a build stopped by its run deadline.

    ``limit`` is the configured run timeout (s), which the reason states;
    ``late`` is how long after the deadline the alarm fired (s). A deadline
    noticed late says so, so that an outage of the control plane is not
    mistaken for a slow build."""
    return _reason("run", limit, late, alarm_poll)


def startup_deadline_reason(limit: float, late: float, alarm_poll: float) -> str:
    """The final reason of a build no runner started before its startup
    deadline: as ``run_deadline_reason``, with ``limit`` the configured
    startup deadline (s) and ``late`` how long after it the alarm fired (s)."""
    return _reason("startup", limit, late, alarm_poll)


def _reason(kind: str, limit: float, late: float, alarm_poll: float) -> str:
    reason = f"{kind} deadline of {limit:g} s"
    if late > max(LATE_MIN, LATE_POLLS * alarm_poll):
        reason += (
            f" (it passed while the control plane could not act, and was noticed"
            f" {round(late)} s late)"
        )
    return reason
