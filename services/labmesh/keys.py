"""CurveZMQ key pairs as ZeroMQ certificate files (`zmq.auth`), for `labmesh keys`.

`new_key_pair(directory, name)` writes `NAME.key` (the public key, to hand to others) and
`NAME.key_secret` (the secret key, readable by its owner only); `public_key(...)` reads the
public key back (Z85 text, 40 characters). No key material is made here: pyzmq's
`zmq.auth.create_certificates` makes it, with libzmq's CURVE key generator.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq.auth

from labmesh.discovery.registry import NAME_PATTERN
from labmesh.security import KEYS_ENV as ENV_VAR
from labmesh.security import Z85_KEY_CHARS, KeyFileError, default_directory, public_key_of

__all__ = ["ENV_VAR", "KeyFileError", "default_directory", "new_key_pair", "public_key"]


def new_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret in `directory` (made, owner-only, if missing).
    Refuses to overwrite an existing pair: a lab's trust is bound to it."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise KeyFileError(
            f"key name {name!r} is not a name: use letters, digits, '.', '_' and '-' (up to 63)"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    existing = [p for p in (public, secret) if p.exists()]
    if existing:
        raise KeyFileError(
            f"{existing[0]} exists already; keys are not replaced (everyone who trusts this one "
            "would lose it): pick another name, or remove the old pair on purpose"
        )
    made_public, made_secret = zmq.auth.create_certificates(directory, name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def public_key(name_or_path: str, directory: Path) -> str:
    """The public key (Z85) of a key file path, or of NAME in `directory`."""
    if len(name_or_path) == Z85_KEY_CHARS and not Path(name_or_path).exists():
        name_or_path = str(directory / f"{name_or_path}.key")  # a name, never a key here
    return public_key_of(name_or_path, directory).decode()
