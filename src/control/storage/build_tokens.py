"""Build tokens as the edge sees them: is this token some live build's?

The edge asks before it reads a request (``control.api.edge``), so a caller
holding no live build token never makes the server buffer a log batch; the
handler then checks that the request names that build.
"""

from __future__ import annotations

from control.storage.accounts import hash_token
from control.storage.db import Database, fetch_value


async def build_of(db: Database, token: str) -> str | None:
    """The id of the build whose live token ``token`` is, or None (a
    build's token hash is cleared when it ends or is handed back). One
    index lookup (``builds_live_token``). Raises ``Unavailable`` when the
    database is down."""
    async with db.connection() as conn:
        build_id: str | None = await fetch_value(
            conn, "SELECT id::text FROM builds WHERE token_hash = %s", (hash_token(token),)
        )
    return build_id
