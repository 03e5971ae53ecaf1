"""Short ids: a unique prefix of a UUID stands for it, as in git and docker.

Every lookup of a build, project, token or deploy hook by a caller's id goes
through ``expand`` so the gRPC API, the HTTP/JSON API, the dashboard and the
CLI all accept ``3f2a1b`` for ``3f2a1b7c-...``. A prefix only ever matches
rows in the scope the caller passes (its account, or a project of it): a
prefix never tells a caller that another account's row exists.
"""

from __future__ import annotations

import re
import uuid

from control.errors import InvalidArgument, NotFound
from control.storage.db import Conn, fetch_column

# Six hex digits: 16.7 million values, so a short id stays unique in an
# account with thousands of builds; shorter ones would match too much.
MIN_PREFIX = 6
# Ids shown when a prefix is ambiguous; the answer says how many more.
MAX_CANDIDATES = 10
# A prefix is hex digits and dashes (as a UUID is written), no longer than a
# whole UUID.
_PREFIX = re.compile(r"[0-9a-fA-F-]{6,36}")


def is_uuid(value: str) -> bool:
    """True for a complete UUID in any form ``uuid.UUID`` parses."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def is_prefix(ref: str) -> bool:
    """True when ``ref`` could be a short id: at least ``MIN_PREFIX`` hex
    digits (dashes allowed where a UUID has them) and not a whole UUID."""
    if is_uuid(ref) or not _PREFIX.fullmatch(ref):
        return False
    return len(ref.replace("-", "")) >= MIN_PREFIX


def short(full_id: str) -> str:
    """The id as lists show it: its first 8 hex digits (a build list of an
    account is unique well beyond that; commands accept any unique prefix of
    6 or more)."""
    return full_id[:8]


async def expand(
    conn: Conn,
    ref: str,
    *,
    table: str,
    kind: str,
    field: str,
    scope: str,
    params: tuple[object, ...],
) -> str:
    """The one id in ``table`` whose text starts with ``ref`` among the rows
    matching ``scope`` (an SQL condition on the table's columns, with
    ``params``). ``ref`` must satisfy ``is_prefix``; ``table`` and ``scope``
    are SQL written by the caller, never user text.

    Raises ``NotFound`` (naming ``kind``) when no row matches and
    ``InvalidArgument(field, ...)`` listing the candidates when several do.
    """
    digits = ref.replace("-", "").lower()
    # The smallest and largest UUIDs with these leading digits: a range on
    # the primary key, so the lookup uses its index.
    low = str(uuid.UUID(digits.ljust(32, "0")))
    high = str(uuid.UUID(digits.ljust(32, "f")))
    ids: list[str] = await fetch_column(
        conn,
        f"SELECT id::text FROM {table} WHERE id BETWEEN %s AND %s AND ({scope})"
        f" ORDER BY id LIMIT %s",
        (low, high, *params, MAX_CANDIDATES + 1),
    )
    # Dashes in the prefix must sit where the UUID has them.
    found = [i for i in ids if i.startswith(ref.lower())]
    if not found:
        raise NotFound(f"{kind} {ref!r} not found")
    if len(found) == 1:
        return found[0]
    shown = ", ".join(found[:MAX_CANDIDATES])
    more = " and more" if len(found) > MAX_CANDIDATES else ""
    raise InvalidArgument(
        field,
        f"{ref!r} is ambiguous: it starts the ids of {kind}s {shown}{more}; give more characters",
    )
