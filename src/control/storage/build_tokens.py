"""Build tokens as the edge sees them: is this token some live build's?

The edge asks before it reads a request (``control.api.edge``), so a caller
holding no live build token never makes the server buffer a log batch; the
handler then checks the token against the build the request names
(``Lifecycle.check_build_token``).
"""

from __future__ import annotations

from control.storage.accounts import hash_token
from control.storage.db import Database, fetch_value


async def is_live(db: Database, token: str) -> bool:
    """True when ``token`` is the token of a build that has not ended (a
    build's token hash is cleared when it ends or is handed back). One
    index lookup (``builds_live_token``). Raises ``Unavailable`` when the
    database is down."""
    async with db.connection() as conn:
        live: bool = await fetch_value(
            conn, "SELECT EXISTS (SELECT 1 FROM builds WHERE token_hash = %s)", (hash_token(token),)
        )
    return live
