"""The pure scheduling policy: limits, FIFO per account, fairness across
accounts, and no idle slot while an eligible build waits."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from control.scheduler.policy import AccountQueue, QueuedBuild, pick

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def queue(account: str, n: int, *, limit: int = 6, active: int = 0, start: int = 0) -> AccountQueue:
    """``n`` builds named ``<account>-<i>``, queued one second apart from
    ``start`` seconds after T0."""
    return AccountQueue(
        account,
        limit,
        active,
        tuple(QueuedBuild(f"{account}-{i}", T0 + timedelta(seconds=start + i)) for i in range(n)),
    )


def test_fifo_within_an_account_up_to_its_limit() -> None:
    assert pick([queue("a", 10, limit=3)], 100) == ["a-0", "a-1", "a-2"]
    assert pick([queue("a", 10, limit=3, active=2)], 100) == ["a-0"]
    assert pick([queue("a", 10, limit=3, active=3)], 100) == []


def test_free_slots_bound_everything() -> None:
    assert pick([queue("a", 10), queue("b", 10)], 3) == ["a-0", "b-0", "a-1"]
    assert pick([queue("a", 10)], 0) == []
    assert pick([queue("a", 10)], -2) == []


def test_a_backlog_does_not_delay_another_account_s_single_build() -> None:
    # "a" queued 1,000 builds long before "b" queued one, and already runs 5.
    backlog = queue("a", 1000, active=5)
    single = queue("b", 1, start=5000)
    assert pick([backlog, single], 1) == ["b-0"]
    # With room for both, "b" still comes first: it has fewer active builds.
    assert pick([backlog, single], 2) == ["b-0", "a-0"]
    # "a" at its limit gets nothing however long its backlog.
    assert pick([queue("a", 1000, active=6), single], 10) == ["b-0"]


def test_slots_fill_the_least_served_account_first() -> None:
    # Water-filling: "b" is raised to "a"'s level before "a" gets more.
    chosen = pick([queue("a", 10, limit=10, active=4), queue("b", 10, limit=10)], 6)
    assert Counter(c.split("-")[0] for c in chosen) == {"b": 5, "a": 1}


def test_ties_go_to_the_account_whose_next_build_waited_longest() -> None:
    older = queue("z", 3, start=0)
    newer = queue("a", 3, start=100)
    assert pick([newer, older], 1) == ["z-0"]
    assert pick([newer, older], 4) == ["z-0", "a-0", "z-1", "a-1"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[AccountQueue], int]:
    count = draw(st.integers(0, 6))
    accounts = []
    for n in range(count):
        limit = draw(st.integers(1, 8))
        active = draw(st.integers(0, 10))
        offsets = sorted(draw(st.lists(st.integers(0, 50), max_size=12)))
        accounts.append(
            AccountQueue(
                f"acct{n}",
                limit,
                active,
                tuple(
                    QueuedBuild(f"acct{n}-{i}", T0 + timedelta(seconds=o))
                    for i, o in enumerate(offsets)
                ),
            )
        )
    return accounts, draw(st.integers(-2, 40))


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_pick_properties(scenario: tuple[list[AccountQueue], int]) -> None:
    accounts, free = scenario
    chosen = pick(accounts, free)
    by_account = {a.account_id: a for a in accounts}
    taken = Counter(build_id.split("-")[0] for build_id in chosen)

    # Bounded by the free slots and each account's room; nothing twice.
    assert len(chosen) <= max(free, 0)
    assert len(set(chosen)) == len(chosen)
    for account_id, n in taken.items():
        a = by_account[account_id]
        assert n <= max(a.limit - a.active, 0)

    # FIFO: what an account gets is a prefix of its queue, in order.
    for a in accounts:
        mine = [c for c in chosen if c.split("-")[0] == a.account_id]
        assert mine == [b.build_id for b in a.queued[: len(mine)]]

    # Work-conserving: a slot stays idle only when no eligible build is left.
    eligible = sum(min(len(a.queued), max(a.limit - a.active, 0)) for a in accounts)
    assert len(chosen) == min(max(free, 0), eligible)

    # Max-min fair: an account that got a slot is never more than one
    # build above an account that still had an eligible build left over.
    for a in accounts:
        left_over = min(len(a.queued), max(a.limit - a.active, 0)) > taken[a.account_id]
        if not left_over:
            continue
        for b in accounts:
            if taken[b.account_id]:
                assert b.active + taken[b.account_id] <= a.active + taken[a.account_id] + 1
