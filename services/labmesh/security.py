"""CurveZMQ keys as labmesh uses them: key pairs, the keyring of known clients, the ZAP handler.

Nothing here is cryptography of our own: libzmq does CURVE, pyzmq's `zmq.auth` reads the
certificate files and runs the ZAP handler (`ThreadAuthenticator`); this module only decides
which keys those get. See docs/security.md.

Environment, for clients and command-line tools:
    LABMESH_KEY            this user's key pair: a name in the keys directory or a path to its
                           `.key_secret` file (`labmesh keys new NAME` makes one)
    LABMESH_DISCOVERY_KEY  discovery's public key: Z85 text (40 characters), a key name or a
                           path to its `.key` file
    LABMESH_KEYS           the keys directory (default ~/.config/labmesh/keys)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from labmesh.logbudget import LogBudget
from labmesh.protocol.errors import LabmeshError

log = logging.getLogger("labmesh.security")

KEY_ENV = "LABMESH_KEY"
KEYS_ENV = "LABMESH_KEYS"
DISCOVERY_KEY_ENV = "LABMESH_DISCOVERY_KEY"
#: The ZAP domain of plaintext endpoints (CURVE endpoints have one per server: `labmesh/NAME`).
PLAINTEXT_DOMAIN = "labmesh-plaintext"
#: How often a keyring looks at its directories again (s): a new .key file is honoured within it.
RELOAD_S = 1.0
#: Key files read from one directory, at most (a directory is a lab's list of people).
MAX_KEYS_PER_DIRECTORY = 10_000
Z85_KEY_CHARS = 40


class KeyFileError(LabmeshError):
    """A key pair that cannot be made or read; the message says why and what to do."""

    wire_type = "KeyFileError"


def default_directory() -> Path:
    """Where keys live unless told otherwise: $LABMESH_KEYS, else ~/.config/labmesh/keys."""
    configured = os.environ.get(KEYS_ENV)
    return Path(configured) if configured else Path.home() / ".config" / "labmesh" / "keys"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair (Z85 bytes, as libzmq takes them) and the name it was loaded as."""

    name: str
    public: bytes
    secret: bytes


def load_key_pair(name_or_path: str | os.PathLike, directory: Path | None = None) -> KeyPair:
    """The key pair in `NAME.key_secret` of the keys directory, or at a path (the `.key_secret`
    file, or its `.key` twin next to it)."""
    directory = directory or default_directory()
    path = Path(name_or_path)
    if not path.exists():
        path = directory / f"{name_or_path}.key_secret"
    elif path.suffix == ".key":
        path = path.with_suffix(".key_secret")
    if not path.exists():
        raise KeyFileError(
            f"no key pair {str(name_or_path)!r}: {path} does not exist; make one with "
            f"`labmesh keys new NAME` (keys directory: {directory}, ${KEY_ENV} picks one)"
        )
    public, secret = _read_certificate(path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key (it is a public .key file)")
    return KeyPair(path.stem, public, secret)


def public_key_of(text: str | bytes, directory: Path | None = None) -> bytes:
    """A public key given as Z85 text (40 characters), a key name or a `.key` file path."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip()
    if len(text) == Z85_KEY_CHARS and not Path(text).exists():
        try:
            zmq.utils.z85.decode(text)
        except (ValueError, KeyError):
            raise KeyFileError(f"{text!r} is not a Z85 public key") from None
        return text.encode("ascii")
    directory = directory or default_directory()
    path = Path(text)
    if not path.exists():
        path = directory / f"{text}.key"
    if not path.exists():
        raise KeyFileError(
            f"no key {text!r}: it is neither a public key (40 Z85 characters) nor a file, and "
            f"{path} does not exist; make one with `labmesh keys new {text}` (keys directory: "
            f"{directory})"
        )
    return _read_certificate(path)[0]


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path} is not a ZeroMQ certificate file: {exc}") from None


_env_pair: tuple[str, KeyPair | None] | None = None
_env_lock = threading.Lock()


def key_from_environment() -> KeyPair | None:
    """This process's key pair from $LABMESH_KEY (None when unset); read once per value."""
    global _env_pair
    spec = os.environ.get(KEY_ENV, "").strip()
    with _env_lock:
        if _env_pair is None or _env_pair[0] != spec:
            _env_pair = (spec, load_key_pair(spec) if spec else None)
        return _env_pair[1]


def discovery_key_from_environment() -> bytes | None:
    """Discovery's public key from $LABMESH_DISCOVERY_KEY (None when unset)."""
    spec = os.environ.get(DISCOVERY_KEY_ENV, "").strip()
    return public_key_of(spec) if spec else None


class Keyring:
    """The clients a server knows: public key (Z85 text) -> name.

    Keys come from a mapping (name -> Z85 key or key file path) and from directories of
    ZeroMQ `.key` files (the file name, without `.key`, is the name). Directories are read
    again at most every RELOAD_S when a lookup happens and a directory changed, so adding or
    removing a file grants or revokes a key without a restart (connections already made stay
    until they close; their requests are checked against the current names).
    """

    def __init__(
        self,
        keys: Mapping[str, str] | None = None,
        directories: Iterable[str | os.PathLike] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fixed: dict[str, str] = {}
        for name, spec in (keys or {}).items():
            self._fixed[public_key_of(spec).decode()] = str(name)
        self.directories = [Path(d) for d in directories]
        for directory in self.directories:
            if not directory.is_dir():
                raise KeyFileError(
                    f"clients directory {directory} does not exist: make it and put each "
                    "client's NAME.key there (`labmesh keys new NAME` writes one)"
                )
        self._clock = clock
        self._lock = threading.Lock()
        self._stamps: list[tuple[int, ...]] = []
        self._names: dict[str, str] = dict(self._fixed)
        self._next_check = 0.0
        self._reload(force=True)

    def name_of(self, key: str) -> str | None:
        """The name of `key` (Z85 text), or None if no source names it."""
        if self.directories and self._clock() >= self._next_check:
            self._reload()
        return self._names.get(key)

    def names(self) -> dict[str, str]:
        """Public key -> name, as known now."""
        if self.directories:
            self._reload()
        return dict(self._names)

    def _reload(self, force: bool = False) -> None:
        with self._lock:
            self._next_check = self._clock() + RELOAD_S
            stamps = [_stamp(directory) for directory in self.directories]
            if not force and stamps == self._stamps:
                return
            self._stamps = stamps
            names = dict(self._fixed)
            for directory in self.directories:
                for key, name in _read_directory(directory).items():
                    names.setdefault(key, name)
            if not force and names != self._names:
                log.info(
                    "keyring: %d known keys (reloaded %s)", len(names), _joined(self.directories)
                )
            self._names = names


def _stamp(directory: Path) -> tuple[int, ...]:
    """What changes when a key file is added, removed or replaced in place: the directory's
    own change time and inode, and every key file's size and change time."""
    try:
        st = directory.stat()
        files = sorted(directory.glob("*.key"))[:MAX_KEYS_PER_DIRECTORY]
        stamp = [st.st_mtime_ns, st.st_ino]
        for path in files:
            fst = path.stat()
            stamp += [fst.st_mtime_ns, fst.st_size]
        return tuple(stamp)
    except OSError:
        return (0,)


def _read_directory(directory: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        paths = sorted(directory.glob("*.key"))[:MAX_KEYS_PER_DIRECTORY]
    except OSError as exc:
        log.warning("keyring: cannot read %s: %s", directory, exc)
        return found
    for path in paths:
        try:
            public, _secret = _read_certificate(path)
        except KeyFileError as exc:
            log.warning("keyring: skipping %s", exc)
            continue
        found[public.decode()] = path.stem
    return found


def _joined(paths: Iterable[Path]) -> str:
    return ", ".join(str(p) for p in paths)


class _Provider:
    """What pyzmq's authenticator asks about each CURVE handshake (domain, Z85 key)."""

    def __init__(self, allow: Callable[[str], bool]) -> None:
        self._allow = allow
        # a stranger's handshake storm costs a few lines per interval, then one summary
        self._logs = LogBudget()

    def callback(self, domain: str, key: bytes) -> bool:
        text = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
        now = time.monotonic()
        for line in self._logs.summaries(now):
            log.warning("%s: %s", domain, line)
        try:
            allowed = bool(self._allow(text))
        except Exception:  # a bug of ours refuses the handshake, never kills the handler
            if self._logs.allow("ZAP decision failed", now):
                log.exception("ZAP decision for %s failed; refused", domain)
            return False
        if not allowed and self._logs.allow("refused an unknown key", now):
            log.warning("%s: refused a CurveZMQ handshake: unknown key %s...", domain, text[:8])
        return allowed


_authenticators: dict[int, tuple[ThreadAuthenticator, set[str]]] = {}
_authenticators_lock = threading.Lock()


def authenticate(context: zmq.Context, domains: Mapping[str, Callable[[str], bool]]) -> None:
    """Have pyzmq's ZAP handler of `context` (started on first use: ZAP is one endpoint per
    context) accept a CURVE handshake in each domain when its function says so for the
    client's key (Z85 text). Plaintext (NULL) handshakes are accepted: the server gives those
    peers the plaintext role."""
    with _authenticators_lock:
        entry = _authenticators.get(id(context))
        if entry is None:
            auth = ThreadAuthenticator(context, log=logging.getLogger("labmesh.zap"))
            auth.start()
            entry = _authenticators[id(context)] = (auth, set())
        auth, used = entry
        for domain, allow in domains.items():
            if domain in used:
                raise ValueError(f"ZAP domain {domain!r} is served twice in one context")
            auth.configure_curve_callback(domain, _Provider(allow))
            used.add(domain)


def stop_authenticating(context: zmq.Context, domains: Iterable[str]) -> None:
    """Forget `domains`; the handler stops with the last one (before the context ends)."""
    with _authenticators_lock:
        entry = _authenticators.get(id(context))
        if entry is None:
            return
        auth, used = entry
        for domain in domains:
            used.discard(domain)
            auth.credentials_providers.pop(domain, None)
        if not used:
            del _authenticators[id(context)]
            auth.stop()


@dataclass(frozen=True, slots=True)
class ServerSecurity:
    """How a secured server listens: its key pair, the keys it knows and their roles.

    Attributes:
        pair: the server's key pair (clients are given its public key, by discovery or by hand).
        keyring: the clients it knows, by public key.
        roles: key name -> role on this device (`*`: any other known key); see labmesh.access.
        plaintext_role: the role of peers on the plaintext listener.
        plaintext_address: where the plaintext listener is (None: there is none).
    """

    pair: KeyPair
    keyring: Keyring
    roles: Mapping[str, str] = field(default_factory=dict)
    plaintext_role: str = "none"
    plaintext_address: str | None = None


def server_curve(sock: zmq.Socket, pair: KeyPair, domain: str) -> None:
    """Make the next bind of `sock` a CURVE server endpoint with `pair`, checked by ZAP."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())


def server_plaintext(sock: zmq.Socket) -> None:
    """Make the next bind of `sock` a plaintext endpoint (its peers get the plaintext role)."""
    sock.setsockopt(zmq.CURVE_SERVER, 0)
    sock.setsockopt(zmq.ZAP_DOMAIN, PLAINTEXT_DOMAIN.encode())


def client_curve(sock: zmq.Socket, pair: KeyPair, server_key: bytes) -> None:
    """Make the next connect of `sock` a CURVE client of the server with `server_key`."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)


@dataclass(frozen=True, slots=True)
class ClientCurve:
    """What a client needs for one CURVE connection: its own pair and the server's key."""

    pair: KeyPair
    server_key: bytes

    def apply(self, sock: zmq.Socket) -> None:
        client_curve(sock, self.pair, self.server_key)


def client_security(
    server_key: bytes | str | None, key: KeyPair | str | None, what: str
) -> ClientCurve | None:
    """The CURVE settings for a connection to a server with `server_key` (None: plaintext),
    with `key` (a pair, a name/path, or None for $LABMESH_KEY); a clear error when the server
    is secured and this process has no key."""
    if not server_key:
        return None
    server = public_key_of(server_key)
    pair = key if isinstance(key, KeyPair) else load_key_pair(key) if key else None
    if pair is None:
        pair = key_from_environment()
    if pair is None:
        raise KeyFileError(
            f"{what} is secured with CurveZMQ (server key {server.decode()[:8]}...): set "
            f"{KEY_ENV} to your key pair (`labmesh keys new NAME`, then give the lab's admin "
            "the NAME.key file), or pass key= to the client"
        )
    return ClientCurve(pair, server)
