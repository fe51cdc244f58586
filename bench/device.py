"""Device servers: the coordinator that measures each server (latency, throughput, capacity,
CPU), and the tables and targets it reports."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    CONCURRENCY,
    PEERS,
    TARGET_CAPACITY_VS_FLOOR,
    TARGET_CAPACITY_VS_PLESTY,
    TARGET_P50_VS_FLOOR,
    TARGET_SERVER_CPU_VS_FLOOR,
    TARGET_TPUT16_VS_FLOOR,
    TARGET_TPUT16_VS_PLESTY,
    Counts,
    ServerSpec,
    bench_command,
)


# ---- the coordinator ---------------------------------------------------------------------------
class Proc:
    """A child process spoken to by JSON lines, read with timeouts, ended by its PID."""

    def __init__(
        self,
        argv: list[str],
        name: str,
        log_dir: Path,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.stderr"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        assert self.popen.stdout is not None
        self._fd = self.popen.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._sel.register(self._fd, selectors.EVENT_READ)

    def send(self, obj: dict[str, Any]) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write((json.dumps(obj) + "\n").encode())
        self.popen.stdin.flush()

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name} (pid {self.pid}) said nothing within {timeout} s")
            if not self._sel.select(left):
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise RuntimeError(f"{self.name} (pid {self.pid}) exited: {self.stderr_tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def recv(self, timeout: float) -> dict[str, Any]:
        return json.loads(self.readline(timeout))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all threads) so far, from /proc."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stderr_tail(self, limit: int = 800) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip()
        return text[-limit:] or "(no stderr)"

    def stop(self) -> None:
        """Close stdin (the polite stop), then SIGTERM, then SIGKILL, each bounded."""
        with contextlib.suppress(OSError, ValueError):
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        try:
            self.popen.wait(3.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(2.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(2.0)
        self._sel.close()
        with contextlib.suppress(OSError):
            assert self.popen.stdout is not None
            self.popen.stdout.close()
        self._log.close()


@dataclass
class ServerResult:
    key: str
    label: str
    latency: dict[str, float] | None = None
    throughput: dict[int, dict[str, Any]] = field(default_factory=dict)
    cpu_us_per_call: dict[str, float] | None = None
    error: str | None = None
    #: Server capacity runs (16 load generators), by pipeline window.
    capacity: dict[int, dict[str, Any]] = field(default_factory=dict)


def combine(rounds: list[ServerResult]) -> ServerResult:
    """One result per server from its rounds: the median of each figure (max of maxima)."""
    first = rounds[0]
    failed = [r for r in rounds if r.error]
    if failed:
        return ServerResult(first.key, first.label, error=failed[0].error)

    def med(values: list[Any]) -> float:
        return round(statistics.median(values), 1)

    lats = [r.latency for r in rounds if r.latency]
    latency = {
        k: (max if k == "max_us" else med)([lat[k] for lat in lats])
        for k in lats[0]
        if k != "percentiles_us"
    }
    latency["percentiles_us"] = _median_percentiles(lats)
    latency["n"] = sum(lat["n"] for lat in lats)
    throughput: dict[int, dict[str, Any]] = {}
    for c in first.throughput:
        runs = [r.throughput[c] for r in rounds]
        throughput[c] = {
            "clients": c,
            "rps": med([run["rps"] for run in runs]),
            "calls": sum(run["calls"] for run in runs),
            "capped": any(run["capped"] for run in runs),
            "server_cpu_us_per_call": med([run["server_cpu_us_per_call"] for run in runs]),
            "client_cpu_us_per_call": med([run["client_cpu_us_per_call"] for run in runs]),
            "rps_per_round": [run["rps"] for run in runs],
        }
    capacity: dict[int, dict[str, Any]] = {}
    for window in first.capacity:
        runs = [r.capacity[window] for r in rounds]
        capacity[window] = {
            "generators": runs[0]["clients"],
            "window": window,
            "rps": med([run["rps"] for run in runs]),
            "calls": sum(run["calls"] for run in runs),
            "wrong": sum(run["wrong"] for run in runs),
            "capped": any(run["capped"] for run in runs),
            "server_cpu_us_per_call": med([run["server_cpu_us_per_call"] for run in runs]),
            "generator_cpu_us_per_call": med([run["client_cpu_us_per_call"] for run in runs]),
            "server_cores_busy": round(
                statistics.median(run["server_cores_busy"] or 0.0 for run in runs), 2
            ),
            "rps_per_round": [run["rps"] for run in runs],
        }
    cpu = {
        side: med([r.cpu_us_per_call[side] for r in rounds if r.cpu_us_per_call])
        for side in ("server", "client")
    }
    latency_rounds = {
        "p50_us_per_round": [lat["p50_us"] for lat in lats],
        "p99_us_per_round": [lat["p99_us"] for lat in lats],
    }
    return ServerResult(
        first.key, first.label, {**latency, **latency_rounds}, throughput, cpu, capacity=capacity
    )


def _median_percentiles(lats: list[dict[str, Any]]) -> list[float]:
    """The rounds' latency distributions combined: each percentile's median over the rounds."""
    rows = [lat["percentiles_us"] for lat in lats if "percentiles_us" in lat]
    return [round(statistics.median(column), 1) for column in zip(*rows, strict=True)]


class Bench:
    """Runs every server through the same latency and throughput runs."""

    def __init__(
        self,
        counts: Counts,
        log_dir: Path,
        profile_dir: Path | None,
        env: dict[str, str],
        capacity_windows: tuple[int, ...] = (4,),
    ) -> None:
        self.counts = counts
        self.capacity_windows = capacity_windows
        self.log_dir = log_dir
        self.profile_dir = profile_dir
        self.env = env
        self.workers: list[Proc] = []

    def start_workers(self, n: int) -> None:
        limit = str(self.counts.run_limit_s * 40 + 120)
        for i in range(n):
            self.workers.append(
                Proc(
                    bench_command("--worker", "--max-seconds", limit),
                    f"client-{i}",
                    self.log_dir,
                    env=self.env,
                )
            )

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def restart_workers(self) -> None:
        """Fresh workers after a failed run, so no late reply of it is read as the next one's."""
        n = len(self.workers)
        self.stop_workers()
        self.start_workers(n)

    def _run(
        self,
        server: Proc,
        spec: ServerSpec,
        address: str,
        clients: int,
        calls: int,
        warmup: int,
        record: bool,
        load_window: int | None = None,
    ) -> dict[str, Any]:
        """One run: prepare `clients` workers, start them together, collect their figures.

        With `load_window` the workers are load generators (server capacity run) instead of
        clients of the spec's kind.
        """
        workers = self.workers[:clients]
        prepare: dict[str, Any] = {
            "cmd": "prepare",
            "client": spec.client,
            "address": address,
            "timeout_ms": 5000,
            "warmup": warmup,
        }
        limit_s = self.counts.run_limit_s
        if load_window is not None:
            prepare.update(
                client="load", window=load_window, check=spec.load_check, session=spec.load_session
            )
            limit_s = self.counts.capacity_limit_s
        for worker in workers:
            worker.send(prepare)
        errors = []
        for worker in workers:
            reply = worker.recv(30.0)
            if "error" in reply:
                errors.append(f"{worker.name}: {reply['error']}")
        if errors:
            raise RuntimeError("; ".join(errors))
        cpu0 = server.cpu_seconds()
        go = {"cmd": "go", "calls": calls, "record_latency": record, "limit_s": limit_s}
        for worker in workers:
            worker.send(go)
        replies = [worker.recv(limit_s + 30.0) for worker in workers]
        server_cpu = server.cpu_seconds() - cpu0
        errors = [
            f"{w.name}: {r['error']}" for w, r in zip(workers, replies, strict=True) if "error" in r
        ]
        if errors:
            raise RuntimeError("; ".join(errors))
        total = sum(r["count"] for r in replies)
        seconds = max(r["t1"] for r in replies) - min(r["t0"] for r in replies)
        run: dict[str, Any] = {}
        if load_window is not None:
            if not total:
                raise RuntimeError(
                    f"no correct reply to {clients} load generators (window "
                    f"{load_window}); {sum(r['wrong'] for r in replies)} wrong"
                )
            run = {
                "window": load_window,
                "wrong": sum(r["wrong"] for r in replies),
                "server_cores_busy": round(server_cpu / seconds, 2) if seconds > 0 else None,
            }
        return {
            **run,
            "clients": clients,
            "calls": total,
            "seconds": round(seconds, 4),
            "rps": round(total / seconds, 1) if seconds > 0 else 0.0,
            "capped": total < clients * calls,
            "server_cpu_us_per_call": round(server_cpu / total * 1e6, 1) if total else None,
            "client_cpu_us_per_call": round(sum(r["cpu_s"] for r in replies) / total * 1e6, 1)
            if total
            else None,
            "latency": replies[0].get("latency"),
        }

    def _start_profiler(
        self, server: Proc, spec: ServerSpec, round_no: int
    ) -> subprocess.Popen | None:
        if self.profile_dir is None:
            return None
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(py_spy).exists():
            print("  (py-spy not found; no profile)", file=sys.stderr)
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{spec.key}.round{round_no + 1}.folded"
        return subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(server.pid),
                "--format",
                "raw",
                "--output",
                str(out),
                "--rate",
                "250",
                "--threads",
                "--gil",
                "--nonblocking",
                "--duration",
                "600",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def measure(self, spec: ServerSpec, round_no: int = 0) -> ServerResult:
        result = ServerResult(spec.key, spec.label)
        server = Proc(spec.argv, f"server-{spec.key}", self.log_dir, cwd=spec.cwd, env=self.env)
        profiler: subprocess.Popen | None = None
        try:
            line = server.readline(30.0)
            if not line.startswith("ADDRESS "):
                raise RuntimeError(f"{spec.label} did not announce its address: {line!r}")
            address = line.split(" ", 1)[1]
            profiler = self._start_profiler(server, spec, round_no)
            counts = self.counts
            lat = self._run(
                server, spec, address, 1, counts.latency_calls, counts.latency_warmup, record=True
            )
            result.latency = lat["latency"]
            result.cpu_us_per_call = {
                "server": lat["server_cpu_us_per_call"],
                "client": lat["client_cpu_us_per_call"],
            }
            for clients in CONCURRENCY:
                run = self._run(
                    server,
                    spec,
                    address,
                    clients,
                    counts.calls_per_client[clients],
                    counts.throughput_warmup,
                    record=False,
                )
                run.pop("latency")
                result.throughput[clients] = run
            for window in self.capacity_windows:
                run = self._run(
                    server,
                    spec,
                    address,
                    max(CONCURRENCY),
                    counts.capacity_requests,
                    counts.capacity_warmup,
                    record=False,
                    load_window=window,
                )
                run.pop("latency")
                result.capacity[window] = run
            if not server.alive():
                raise RuntimeError(f"{spec.label} exited during the runs")
        except (RuntimeError, TimeoutError, OSError) as exc:
            result.error = f"{exc} [server stderr: {server.stderr_tail(300)}]"
            self.restart_workers()
        finally:
            if profiler is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(profiler.pid, signal.SIGINT)
                try:
                    profiler.wait(10.0)
                except subprocess.TimeoutExpired:
                    os.kill(profiler.pid, signal.SIGKILL)
                    profiler.wait(2.0)
            server.stop()
        return result


# ---- report ------------------------------------------------------------------------------------
def _ratio(value: float | None, base: float | None) -> str:
    if not value or not base:
        return ""
    return f" ({value / base:.2f}x)"


def _rps(result: ServerResult, clients: int) -> float | None:
    run = result.throughput.get(clients)
    return run["rps"] if run else None


def _p50(result: ServerResult) -> float | None:
    return result.latency["p50_us"] if result.latency else None


def _one_line(error: str, limit: int = 160) -> str:
    """The gist of an error for a table cell: its first line, and the last line of any
    traceback quoted in it."""
    lines = [
        line.strip() for line in error.split("[server stderr:")[0].splitlines() if line.strip()
    ]
    gist = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return gist.replace("|", "/")[:limit]


def _p99(result: ServerResult) -> float | None:
    return result.latency["p99_us"] if result.latency else None


def markdown_table(results: list[ServerResult], floor: ServerResult) -> str:
    head = (
        "| server | query p50 us | query p99 us | 1 client req/s | 4 clients req/s "
        "| 16 clients req/s | server CPU us/call | client CPU us/call |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in results:
        if r.error:
            lines.append(f"| {r.label} | failed: {_one_line(r.error)} |" + " |" * 6)
            continue
        assert r.latency is not None and r.cpu_us_per_call is not None
        cells = [
            f"{r.latency['p50_us']:.0f}{_ratio(r.latency['p50_us'], _p50(floor))}",
            f"{r.latency['p99_us']:.0f}{_ratio(r.latency['p99_us'], _p99(floor))}",
        ]
        for c in CONCURRENCY:
            rps = _rps(r, c)
            capped = " (capped)" if r.throughput[c]["capped"] else ""
            cells.append(f"{rps:.0f}{_ratio(rps, _rps(floor, c))}{capped}")
        cpu16 = r.throughput[16]
        cells.append(f"{r.cpu_us_per_call['server']:.0f} / {cpu16['server_cpu_us_per_call']:.0f}")
        cells.append(f"{r.cpu_us_per_call['client']:.0f} / {cpu16['client_cpu_us_per_call']:.0f}")
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def _cap(result: ServerResult | None, window: int) -> float | None:
    run = result.capacity.get(window) if result is not None and not result.error else None
    return run["rps"] if run else None


def capacity_table(
    results: list[ServerResult], floor: ServerResult, plesty: ServerResult | None, window: int
) -> str:
    versus = f"vs {plesty.label}" if plesty is not None else "vs PLESTY"
    head = (
        f"| server | req/s | vs floor | {versus} | server CPU us/req "
        "| generator CPU us/req | server CPU busy (cores) | req/s per round |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in results:
        if r.error:
            lines.append(f"| {r.label} | failed: {_one_line(r.error)} |" + " |" * 6)
            continue
        run = r.capacity[window]
        notes = (" (capped)" if run["capped"] else "") + (
            f" ({run['wrong']} wrong replies)" if run["wrong"] else ""
        )
        base, theirs = _cap(floor, window), _cap(plesty, window)
        cells = [
            f"{run['rps']:.0f}{notes}",
            f"{run['rps'] / base:.2f}x" if base else "n/a",
            f"{run['rps'] / theirs:.2f}x" if theirs else "n/a",
            f"{run['server_cpu_us_per_call']:.0f}",
            f"{run['generator_cpu_us_per_call']:.0f}",
            f"{run['server_cores_busy']:.2f}",
            " / ".join(f"{rps:.0f}" for rps in run["rps_per_round"]),
        ]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_target(
    server: str, table: str, target: str, mine: float | None, base: float | None, minimum: float
) -> dict[str, Any]:
    ratio = mine / base if mine and base else None
    return {
        "server": server,
        "measured_by": table,
        "target": target,
        "ratio": _round(ratio),
        "met": ratio is not None and ratio >= minimum,
    }


def evaluate_targets(
    results: list[ServerResult], floor: ServerResult, plesty: ServerResult | None, window: int
) -> list[dict[str, Any]]:
    """The targets of every labmesh server: the p50 latency one, and the two 16-way throughput
    ones on both tables (16 client-library clients; 16 load generators = server capacity)."""
    targets = []
    has_plesty = plesty is not None and not plesty.error
    library = "client library, 16 clients"
    capacity = f"server capacity, 16 load generators (window {window})"
    for r in results:
        if not r.key.startswith("labmesh") or r.error:
            continue
        p50_ratio = _p50(r) / _p50(floor) if _p50(r) and _p50(floor) else None
        targets.append(
            {
                "server": r.label,
                "measured_by": "latency, 1 client",
                "target": f"query p50 <= {TARGET_P50_VS_FLOOR}x floor",
                "ratio": _round(p50_ratio),
                "met": p50_ratio is not None and p50_ratio <= TARGET_P50_VS_FLOOR,
            }
        )
        for table, mine, base, theirs, vs_floor, vs_plesty in (
            (
                library,
                _rps(r, 16),
                _rps(floor, 16),
                _rps(plesty, 16) if has_plesty else None,
                TARGET_TPUT16_VS_FLOOR,
                TARGET_TPUT16_VS_PLESTY,
            ),
            (
                capacity,
                _cap(r, window),
                _cap(floor, window),
                _cap(plesty, window),
                TARGET_CAPACITY_VS_FLOOR,
                TARGET_CAPACITY_VS_PLESTY,
            ),
        ):
            targets.append(
                _ratio_target(r.label, table, f"req/s >= {vs_floor}x floor", mine, base, vs_floor)
            )
            if has_plesty:
                assert plesty is not None
                targets.append(
                    _ratio_target(
                        r.label,
                        table,
                        f"req/s >= {vs_plesty}x {plesty.label}",
                        mine,
                        theirs,
                        vs_plesty,
                    )
                )
        mine_cpu = r.capacity.get(window, {}).get("server_cpu_us_per_call")
        floor_cpu = floor.capacity.get(window, {}).get("server_cpu_us_per_call")
        cpu_ratio = mine_cpu / floor_cpu if mine_cpu and floor_cpu else None
        targets.append(
            {
                "server": r.label,
                "measured_by": capacity,
                "target": f"server CPU per request <= {TARGET_SERVER_CPU_VS_FLOOR}x floor's",
                "ratio": _round(cpu_ratio),
                "measured": f"{mine_cpu:.0f} vs {floor_cpu:.0f} us ({cpu_ratio:.2f}x)"
                if cpu_ratio
                else "n/a",
                "met": cpu_ratio is not None and cpu_ratio <= TARGET_SERVER_CPU_VS_FLOOR,
            }
        )
    return targets


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| server | measured by | target | measured | met |", "|---|---|---|---|---|"]
    for t in targets:
        measured = t.get("measured") or (f"{t['ratio']:.2f}x" if t["ratio"] is not None else "n/a")
        lines.append(
            f"| {t['server']} | {t['measured_by']} | {t['target']} | {measured} | "
            f"{'yes' if t['met'] else 'NO'} |"
        )
    return "\n".join(lines)


def _version_of(python: str, module: str, dist: str) -> str:
    code = f"import importlib.metadata as m, {module}; print(m.version({dist!r}))"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


def server_specs(
    args: argparse.Namespace, max_s: str, plesty_dir: str
) -> tuple[list[ServerSpec], str]:
    peers = [str(PEERS), "--max-seconds", max_s]
    specs = [
        ServerSpec(
            "floor",
            "floor: raw pyzmq ROUTER echo",
            [sys.executable, peers[0], "echo", *peers[1:]],
            "raw",
            load_check="id",
            load_session="random",
        ),
        ServerSpec(
            "labmesh_fixed",
            "labmesh fixed_threading=True",
            [sys.executable, peers[0], "labmesh", "--fixed", *peers[1:]],
            "labmesh",
        ),
        ServerSpec(
            "labmesh_pool",
            "labmesh fixed_threading=False",
            [sys.executable, peers[0], "labmesh", *peers[1:]],
            "labmesh",
        ),
    ]
    interop = Path(args.interop_python)
    if not interop.exists():
        return (
            specs,
            f"PLESTY skipped: no interop virtualenv ({interop} is missing; "
            "build it with scripts/interop_env.py)",
        )
    version = _version_of(str(interop), "plesty.lib.service", "plesty_lib")
    if version == "?":
        return specs, f"PLESTY skipped: {interop} cannot import plesty.lib.service"
    specs.append(
        ServerSpec(
            "plesty",
            f"PLESTY {version} fixed_threading=True, logging WARNING",
            [
                str(interop),
                peers[0],
                "plesty",
                "--fixed",
                "--plesty-log-level",
                "WARNING",
                *peers[1:],
            ],
            "labmesh",
            cwd=plesty_dir,
            load_check="ok",
        )
    )
    if not args.no_plesty_default_logging:
        specs.append(
            ServerSpec(
                "plesty_default_logging",
                f"PLESTY {version} fixed_threading=True, its INFO logging",
                [str(interop), peers[0], "plesty", "--fixed", *peers[1:]],
                "labmesh",
                cwd=plesty_dir,
                load_check="ok",
            )
        )
    return specs, f"PLESTY {version} from {interop}"
