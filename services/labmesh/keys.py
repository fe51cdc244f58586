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
from labmesh.protocol.errors import LabmeshError

#: Where keys live unless told otherwise: $LABMESH_KEYS, else ~/.config/labmesh/keys.
ENV_VAR = "LABMESH_KEYS"


class KeyFileError(LabmeshError):
    """A key pair that cannot be made or read; the message says why and what to do."""

    wire_type = "KeyFileError"


def default_directory() -> Path:
    configured = os.environ.get(ENV_VAR)
    return Path(configured) if configured else Path.home() / ".config" / "labmesh" / "keys"


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
    path = Path(name_or_path)
    if not path.exists():
        path = directory / f"{name_or_path}.key"
    if not path.exists():
        raise KeyFileError(
            f"no key {name_or_path!r}: neither a file nor {path}; make one with "
            f"`labmesh keys new {name_or_path}` (keys directory: {directory})"
        )
    try:
        public, _secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path} is not a ZeroMQ certificate file: {exc}") from None
    return public.decode()
