"""Reading a repository's refs with ``git ls-remote``."""

from __future__ import annotations

import asyncio

from control.errors import InvalidArgument

LS_REMOTE_SECONDS = 20


async def resolve_branch_head(repo_url: str, branch: str) -> str:
    """Return the commit at the tip of ``branch`` with ``git ls-remote``.

    Raises ``InvalidArgument`` when the repository or branch cannot be read
    within ``LS_REMOTE_SECONDS``.
    """
    proc = await asyncio.create_subprocess_exec(
        "git",
        "-c",
        "safe.directory=*",
        "ls-remote",
        "--",
        repo_url,
        f"refs/heads/{branch}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=LS_REMOTE_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise InvalidArgument(
            "branch", f"the repository did not answer within {LS_REMOTE_SECONDS} s"
        ) from None
    if proc.returncode != 0:
        raise InvalidArgument("repo_url", f"cannot read the repository: {err.decode()[-300:]}")
    for line in out.decode().splitlines():
        sha, _, ref = line.partition("\t")
        if ref == f"refs/heads/{branch}":
            return sha
    raise InvalidArgument("branch", f"branch {branch!r} does not exist in the repository")
