"""What a build that ran past its run deadline is told: pure, no I/O."""

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
    reason = f"run deadline of {limit} s"
    if late > max(LATE_MIN, LATE_POLLS * alarm_poll):
        reason += (
            f" (it passed while the control plane could not act, and was noticed"
            f" {round(late)} s late)"
        )
    return reason
