"""Who may do what: scopes and the caller's account, checked by services.

The gRPC edge checks each method's scope before the servicer runs; the
dashboard calls services directly, so the services check again here with
the same table. Checking twice costs a set lookup.
"""

from __future__ import annotations

from control.errors import PermissionDenied
from control.storage.accounts import Principal

# Each scope implies the ones after it; "system" is the bootstrap admin's.
IMPLIED: dict[str, frozenset[str]] = {
    "system": frozenset({"system", "admin", "write", "read"}),
    "admin": frozenset({"admin", "write", "read"}),
    "write": frozenset({"write", "read"}),
    "read": frozenset({"read"}),
}


def granted(caller: Principal) -> frozenset[str]:
    """Every scope ``caller`` holds, implied ones included."""
    if caller.kind == "internal":
        return IMPLIED["system"]
    out: set[str] = set()
    for scope in caller.scopes:
        out |= IMPLIED.get(scope, frozenset())
    return frozenset(out)


def may(caller: Principal, scope: str) -> bool:
    """True when ``caller`` is a user (or the control plane) holding ``scope``."""
    return caller.kind in ("user", "internal") and scope in granted(caller)


def check(caller: Principal, scope: str) -> None:
    """Raise ``PermissionDenied`` naming the scope unless ``caller`` holds
    it; for actions of the installation ("system": accounts, key rotation)
    that need no account of the caller's own."""
    if not may(caller, scope):
        raise PermissionDenied(f"this needs the {scope!r} scope")


def require(caller: Principal, scope: str) -> str:
    """Return the caller's account id; raise ``PermissionDenied`` naming the
    scope when the caller lacks it or belongs to no account."""
    check(caller, scope)
    if caller.account_id is None:
        raise PermissionDenied("this token does not belong to an account")
    return caller.account_id
