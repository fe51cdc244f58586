"""A small threaded SCPI instrument on 127.0.0.1 for pyvisa-py tests (`TCPIP::...::SOCKET`).

It answers queries from a table, stores settings written as `HEADER value` when `HEADER?` is in
the table, keeps an SCPI error queue, and can stay silent on chosen queries (to test timeouts)
or answer anything the test puts in the table (to test garbled replies).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable

_UNDEFINED_HEADER = '-113,"Undefined header"'


class ScpiEmulator:
    """A line-based SCPI instrument served on an ephemeral 127.0.0.1 port.

    Parameters:
        replies: answers by query (`"*IDN?": "Thorlabs,PM100D,..."`); a command `H value` sets
            the answer of `H?` when that query is in the table.
        commands: commands without a value that are accepted silently (e.g. a zero).
        silent: queries that never get an answer.
        no_error: what `SYST:ERR?` answers when the queue is empty.
    """

    def __init__(
        self,
        replies: dict[str, str],
        *,
        commands: Iterable[str] = (),
        silent: Iterable[str] = (),
        no_error: str = '0,"No error"',
    ) -> None:
        self.replies = dict(replies)
        self.commands = set(commands)
        self.silent = set(silent)
        self.no_error = no_error
        self.errors: list[str] = []
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []

    @property
    def resource(self) -> str:
        """The VISA resource name pyvisa-py opens this instrument with."""
        return f"TCPIP::127.0.0.1::{self.port}::SOCKET"

    def start(self) -> ScpiEmulator:
        self._spawn(self._accept_loop, "scpi-emulator:accept")
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every thread and close every socket (bounded by `timeout`)."""
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout)
        self._listener.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"emulator threads still running: {alive}"

    def __enter__(self) -> ScpiEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, line: str) -> str | None:
        """What the instrument sends back for one received line (None: nothing)."""
        with self._lock:
            self.received.append(line)
            if line in self.silent:
                return None
            if line == "SYST:ERR?":
                return self.errors.pop(0) if self.errors else self.no_error
            if line.endswith("?"):
                if line in self.replies:
                    return self.replies[line]
                self.errors.append(_UNDEFINED_HEADER)
                return None
            header, _, value = line.partition(" ")
            if value and f"{header}?" in self.replies:
                self.replies[f"{header}?"] = value
            elif line not in self.commands:
                self.errors.append(_UNDEFINED_HEADER)
            return None

    def _spawn(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, f"scpi-emulator:{conn.getpeername()[1]}", conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        buffer = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    raw, buffer = buffer.split(b"\n", 1)
                    reply = self.answer(raw.decode("ascii", "replace").strip())
                    if reply is not None:
                        conn.sendall(reply.encode("latin-1") + b"\n")
