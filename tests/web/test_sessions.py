"""Sessions against the real database, the sign-in throttle and the
redirect check: the rules the browser tests rely on, each case by name."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import aiohttp
import pytest

from control.storage.accounts import revoke_token
from control.storage.sessions import SessionStore
from control.web.login import local_path
from control.web.throttle import FailureThrottle
from tests.helpers import ControlHandle
from tests.web.conftest import Tenant, new_tenant

HOUR = timedelta(hours=1)


async def test_a_session_lives_until_it_expires_is_closed_or_its_token_is_revoked(
    control: ControlHandle, writer: Tenant
) -> None:
    store = SessionStore(control.plane.db)
    opened = await store.open(writer.token, HOUR)
    assert opened is not None
    session_id, session = opened
    assert writer.token not in session_id
    assert session.principal.account_id == writer.account_id
    assert session.principal.scopes == frozenset({"write"})
    found = await store.get(session_id)
    assert found is not None
    assert found.csrf_token == session.csrf_token

    # Born expired: never returned. Short-lived: gone once its time is up.
    assert await store.open(writer.token, timedelta(seconds=-1)) is None
    brief = await store.open(writer.token, timedelta(seconds=1))
    assert brief is not None
    deadline = time.monotonic() + 10
    while await store.get(brief[0]) is not None:
        assert time.monotonic() < deadline, "a 1-second session outlived 10 s"
        await asyncio.sleep(0.1)

    closed = await store.open(writer.token, HOUR)
    assert closed is not None
    await store.close(closed[0])
    assert await store.get(closed[0]) is None

    async with control.plane.db.transaction() as conn:
        await revoke_token(conn, writer.account_id, writer.token_id)
    assert await store.get(session_id) is None
    assert await store.open(writer.token, HOUR) is None


async def test_only_live_user_tokens_of_an_account_open_sessions(
    control: ControlHandle,
) -> None:
    store = SessionStore(control.plane.db)
    assert await store.open("cvy_not-a-token", HOUR) is None
    assert await store.open(control.runner_token, HOUR) is None
    reader = await new_tenant(control, "reader", ("read",))
    opened = await store.open(reader.token, HOUR)
    assert opened is not None
    assert opened[1].principal.scopes == frozenset({"read"})


def test_failed_sign_ins_are_limited_per_client_and_overall() -> None:
    now = [0.0]
    throttle = FailureThrottle(per_client=3, overall=5, window=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.blocked("a") == 0
        throttle.failed("a")
    assert throttle.blocked("a") == 60
    assert throttle.blocked("b") == 0
    throttle.failed("b")
    throttle.failed("c")
    assert throttle.blocked("d") == 60  # five failures in all
    now[0] = 30.0
    assert throttle.blocked("a") == 30
    now[0] = 60.0
    assert throttle.blocked("a") == 0
    assert throttle.blocked("d") == 0


@pytest.mark.parametrize(
    ("target", "followed"),
    [
        ("/builds/1?x=1#L3", "/builds/1?x=1#L3"),
        ("/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("javascript:alert(1)", "/"),
        ("/ok\r\nSet-Cookie: x=1", "/"),
        ("/\tx", "/"),
        ("", "/"),
    ],
)
def test_sign_in_returns_only_to_local_paths(target: str, followed: str) -> None:
    assert local_path(target) == followed


async def test_cookie_posts_need_the_token_and_this_origin(
    control: ControlHandle, writer: Tenant
) -> None:
    """Sign-out is a state change like any other: the session survives
    every refused attempt and ends with the accepted one."""
    store = SessionStore(control.plane.db)
    opened = await store.open(writer.token, HOUR)
    assert opened is not None
    session_id, session = opened
    host = control.http_url.removeprefix("http://")
    token = {"csrf_token": session.csrf_token}
    attempts = [
        ({}, {}, 403),  # no token
        ({"csrf_token": "x" * 43}, {}, 403),  # a wrong token
        (token, {"Origin": "http://evil.example"}, 403),
        (token, {"Origin": "null"}, 403),
        (token, {"Sec-Fetch-Site": "cross-site"}, 403),
        (token, {"Sec-Fetch-Site": "same-site"}, 403),
        # The same host behind a proxy that ends TLS: accepted.
        (token, {"Origin": f"https://{host}", "Sec-Fetch-Site": "same-origin"}, 303),
    ]
    async with aiohttp.ClientSession(cookies={"conveyor_session": session_id}) as http:
        for form, headers, status in attempts:
            assert await store.get(session_id) is not None
            async with http.post(
                control.http_url + "/logout", data=form, headers=headers, allow_redirects=False
            ) as answer:
                assert answer.status == status, (form, headers)
    assert await store.get(session_id) is None
