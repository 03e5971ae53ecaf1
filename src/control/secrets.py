"""Secrets at rest: AES-GCM under the control plane's key.

Keys come from CONVEYOR_SECRET_KEY or the file named by
CONVEYOR_SECRET_KEY_FILE: base64 of 32 random bytes, several separated by
commas, the first being the current key and the others older keys still
accepted for reading (rotation: put the new key first, run `conveyor secrets
rotate`, then drop the old one). Each ciphertext is bound to its project and
name as associated data, so a row copied elsewhere does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.settings import ConfigError
from control.errors import FailedPrecondition

NONCE_BYTES = 12


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:12]


def new_key_text() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def parse_keys(text: str, source: str) -> tuple[bytes, ...]:
    """Parse a comma-separated list of base64 32-byte keys.

    Raises ``ConfigError(source, ...)`` for a malformed key (never
    echoing the key itself)."""
    keys = []
    for index, part in enumerate(p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            key = base64.b64decode(part, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(source, f"key #{index + 1} is not base64") from None
        if len(key) != 32:
            raise ConfigError(source, f"key #{index + 1} must be 32 bytes, not {len(key)}")
        keys.append(key)
    return tuple(keys)


def keys_from_env(env: Mapping[str, str]) -> tuple[bytes, ...]:
    if env.get("CONVEYOR_SECRET_KEY"):
        return parse_keys(env["CONVEYOR_SECRET_KEY"], "CONVEYOR_SECRET_KEY")
    if env.get("CONVEYOR_SECRET_KEY_FILE"):
        path = Path(env["CONVEYOR_SECRET_KEY_FILE"])
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError("CONVEYOR_SECRET_KEY_FILE", f"cannot read {path}: {exc}") from None
        return parse_keys(text, "CONVEYOR_SECRET_KEY_FILE")
    return ()


@dataclass(frozen=True)
class Sealed:
    key_id: str
    nonce: bytes
    ciphertext: bytes


class SecretBox:
    """Encrypts with the first key, decrypts with any. Without keys every
    operation raises ``FailedPrecondition`` saying how to configure one."""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self.current = key_id(keys[0]) if keys else ""

    def _require(self) -> None:
        if not self.current:
            raise FailedPrecondition(
                "the control plane has no secret key: set CONVEYOR_SECRET_KEY or "
                "CONVEYOR_SECRET_KEY_FILE"
            )

    def seal(self, plaintext: str, context: str) -> Sealed:
        self._require()
        nonce = os.urandom(NONCE_BYTES)
        box = self._keys[self.current]
        return Sealed(self.current, nonce, box.encrypt(nonce, plaintext.encode(), context.encode()))

    def open(self, sealed: Sealed, context: str) -> str:
        """Raises ``FailedPrecondition`` when the key is unknown or the data
        was tampered with."""
        self._require()
        box = self._keys.get(sealed.key_id)
        if box is None:
            raise FailedPrecondition(
                f"a secret is encrypted under key {sealed.key_id}, which is not configured"
            )
        try:
            return box.decrypt(sealed.nonce, sealed.ciphertext, context.encode()).decode()
        except InvalidTag:
            raise FailedPrecondition("a stored secret failed its integrity check") from None
