"""A process holding many Server-Sent Events follows of one build's log.

Run by the dashboard part as ``python -m bench.sse_follower HTTP_URL TOKEN
BUILD COUNT``: COUNT connections to ``GET /api/v1/builds/BUILD/logs
?follow=true`` with ``Accept: text/event-stream``, the way a script (or the
build page's EventSource) follows a build over HTTP. Each follower records,
for every ``tick <unix time>`` line, the line's write time and its arrival
time here. Once every stream has delivered its first event it writes
``attached`` on stderr (an SSE answer starts with its first event, so this
is when every response is open). When every stream has ended (the last event carries the build's
final status) it prints one JSON object on stdout, as bench.follower does:
``{"samples": [[written, latency], ...], "calls": COUNT, "errors": [...]}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


class Attached:
    """Counts streams that got their first event; says so once all have."""

    def __init__(self, count: int) -> None:
        self.left = count

    def one(self) -> None:
        self.left -= 1
        if self.left == 0:
            sys.stderr.write("attached\n")
            sys.stderr.flush()


async def follow(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    out: list[tuple[float, float]],
    attached: Attached,
) -> None:
    """Follow one stream to its final event. Raises ``RuntimeError`` for an
    error answer, an error event or a stream that ends without a status."""
    headers = {"Accept": "text/event-stream", "Authorization": f"Bearer {token}"}
    async with session.get(url, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        event = ""
        data: list[str] = []
        first = True
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line:
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif line.startswith("event:"):
                    event = line[6:].strip()
                continue
            if not data:  # a keep-alive comment, or an id without data
                continue
            arrived = time.time()
            message = json.loads("\n".join(data))
            data.clear()
            kind, event = event, ""
            if first:
                first = False
                attached.one()
            if kind == "error":
                raise RuntimeError(f"error event: {message}")
            for entry in message.get("lines", ()):
                text = entry.get("text", "")
                if text.startswith("tick "):
                    written = float(text.split()[1])
                    out.append((written, arrived - written))
            if message.get("status"):
                return
    raise RuntimeError("the stream ended without the build's final status")


async def main(http_url: str, token: str, build_id: str, count: int) -> int:
    url = f"{http_url}/api/v1/builds/{build_id}/logs?follow=true"
    samples: list[tuple[float, float]] = []
    attached = Attached(count)
    # No pool limit and no total timeout: each follower holds its connection
    # for the whole build; the parent bounds the wait and kills this process.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(
            *(follow(session, url, token, samples, attached) for _ in range(count)),
            return_exceptions=True,
        )
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    json.dump({"samples": samples, "calls": count, "errors": errors[:5]}, sys.stdout)
    return 1 if errors else 0


if __name__ == "__main__":
    http_url, token, build_id, count = sys.argv[1:5]
    sys.exit(asyncio.run(main(http_url, token, build_id, int(count))))
