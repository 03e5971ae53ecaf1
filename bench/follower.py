"""A process holding many `StreamLogs(follow=True)` calls on one build.

Run by the live-tail part as ``python -m bench.follower ADDRESS TOKEN BUILD
COUNT``. Each follower records, for every ``tick <unix time>`` line the
build printed, the line's write time and its arrival time here. When every
call has ended (the build is final) it prints one JSON object on stdout:
``{"samples": [[written, latency], ...], "calls": COUNT, "errors": [...]}``.
The build ends the calls, so this process needs no deadline of its own; the
parent bounds its wait and kills it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from grpc import aio

from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import build_manager_pb2_grpc as bm_grpc

# Streams per channel: HTTP/2 connections stay well below their stream limit.
STREAMS_PER_CHANNEL = 50


async def follow(
    stub: bm_grpc.BuildManagerStub, token: str, build_id: str, out: list[tuple[float, float]]
) -> None:
    # The generated stub is typed for the sync API; with an aio channel the
    # call is an async iterator.
    call: Any = stub.StreamLogs(
        bm.StreamLogsRequest(build_id=build_id, follow=True),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    async for message in call:
        arrived = time.time()
        for line in message.lines:
            if line.text.startswith("tick "):
                written = float(line.text.split()[1])
                out.append((written, arrived - written))


async def main(address: str, token: str, build_id: str, count: int) -> int:
    channels = [aio.insecure_channel(address) for _ in range(-(-count // STREAMS_PER_CHANNEL))]
    samples: list[tuple[float, float]] = []
    try:
        stubs = [bm_grpc.BuildManagerStub(c) for c in channels]
        results = await asyncio.gather(
            *(
                follow(stubs[i // STREAMS_PER_CHANNEL], token, build_id, samples)
                for i in range(count)
            ),
            return_exceptions=True,
        )
    finally:
        for channel in channels:
            await channel.close(None)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    json.dump({"samples": samples, "calls": count, "errors": errors[:5]}, sys.stdout)
    return 1 if errors else 0


if __name__ == "__main__":
    address, token, build_id, count = sys.argv[1:5]
    sys.exit(asyncio.run(main(address, token, build_id, int(count))))
