"""`python -m bench` (or scripts/bench.py): run every scenario and print the figures."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench as package
from bench.common import (
    CONCURRENCY,
    DEFAULT_COUNTS,
    DEFAULT_INTEROP_PYTHON,
    DEFAULT_PEERS_PYTHON,
    PEERS_ENV_SCRIPT,
    QUICK_COUNTS,
    REPO,
    TARGET_CAPACITY_VS_PLESTY,
    TARGET_TPUT16_VS_PLESTY,
    PeerStacks,
    _git_state,
    _load_average,
    child_env,
    find_peer_stacks,
)
from bench.device import (
    Bench,
    ServerResult,
    _cap,
    _rps,
    capacity_table,
    combine,
    evaluate_targets,
    markdown_table,
    server_specs,
    targets_table,
)
from bench.discovery import (
    DEFAULT_DISCOVERY_COUNTS,
    QUICK_DISCOVERY_COUNTS,
    DiscoveryBench,
    discovery_report,
    discovery_targets,
    heartbeat_load_main,
)
from bench.idle import idle_targets
from bench.idle import report as idle_report
from bench.idle import run as idle_bench
from bench.laplace import (
    DEFAULT_LAPLACE_COUNTS,
    QUICK_LAPLACE_COUNTS,
    laplace_bench,
    laplace_report,
    laplace_targets,
)
from bench.plot import plot as plot_latency
from bench.security import report as security_report
from bench.security import run as security_bench
from bench.security import security_targets
from bench.stacks import add_floor as stacks_add_floor
from bench.stacks import report as stacks_report
from bench.stacks import run as stacks_bench
from bench.subscriptions import QUICK_SUBSCRIPTIONS, subscription_report, subscription_targets
from bench.subscriptions import run as subscriptions_bench
from bench.worker import worker_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=package.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw the latency distributions per system into this PNG (matplotlib, "
        "the bench extra; bench/plot.py)",
    )
    parser.add_argument(
        "--interop-python",
        default=str(DEFAULT_INTEROP_PYTHON),
        help="Python of the virtualenv with plesty_lib (default: %(default)s)",
    )
    parser.add_argument(
        "--no-plesty-default-logging",
        action="store_true",
        help="skip the PLESTY run with its own INFO logging",
    )
    parser.add_argument(
        "--profile-dir",
        metavar="DIR",
        help="record every server with py-spy into DIR (folded stacks of the "
        "samples where it holds the GIL, i.e. its Python work; one file per "
        "server and round); py-spy slows the servers, so the figures of "
        "such a run are not for publishing",
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds to take the median of (default: 3, or 1 with --quick)"
    )
    parser.add_argument(
        "--capacity-windows",
        default="4",
        metavar="W[,W...]",
        help="requests each load generator keeps in flight in the server "
        "capacity run; several (e.g. 1,4) make one run each, the first "
        "is the one the targets use (default: %(default)s)",
    )
    parser.add_argument(
        "--no-discovery",
        action="store_true",
        help="skip the discovery section (lookup round trip, registry capacity)",
    )
    parser.add_argument(
        "--no-laplace",
        action="store_true",
        help="skip the LAPLACE-LHC section (GET round trip vs the real ServerLHC)",
    )
    parser.add_argument(
        "--no-subscriptions",
        action="store_true",
        help="skip the subscriptions section (1,000 parameters at 10 Hz into one client)",
    )
    parser.add_argument(
        "--no-idle",
        action="store_true",
        help="skip the idle-host section (CPU and RSS of `labmesh serve` with no clients)",
    )
    parser.add_argument(
        "--no-security",
        action="store_true",
        help="skip the security section (query p50 over CurveZMQ vs plaintext)",
    )
    parser.add_argument(
        "--peers-python",
        default=None,
        metavar="PYTHON",
        help="Python of the virtualenv with PyTango, caproto and pyepics (default: "
        f"{DEFAULT_PEERS_PYTHON}, else .cache/epics-venv for Channel Access alone)",
    )
    parser.add_argument(
        "--build-peers",
        action="store_true",
        help="first build that virtualenv from PyPI if it is missing (scripts/peers_env.py)",
    )
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="skip the peer stacks (PyTango, caproto, pyepics) in every section",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat-load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.max_seconds)
        return 0
    if args.heartbeat_load:
        heartbeat_load_main(args.max_seconds)
        return 0

    # Stop cleanly (every child ended by its PID) on Ctrl+C and on SIGTERM, also when started
    # in the background by a shell that set SIGINT to be ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        windows = tuple(dict.fromkeys(int(w) for w in args.capacity_windows.split(",")))
    except ValueError:
        parser.error("--capacity-windows takes whole numbers separated by commas, e.g. 1,4")
    if not windows or not all(1 <= w <= 64 for w in windows):
        parser.error("--capacity-windows: each window must be 1 to 64")
    counts = QUICK_COUNTS if args.quick else DEFAULT_COUNTS
    dcounts = QUICK_DISCOVERY_COUNTS if args.quick else DEFAULT_DISCOVERY_COUNTS
    if args.rounds is not None:
        counts = dataclasses.replace(counts, rounds=max(1, min(args.rounds, 20)))
    peers = _peer_stacks(args)
    print(peers.note, file=sys.stderr)
    started = time.monotonic()
    commit = _git_state()
    load_before = _load_average()
    with tempfile.TemporaryDirectory(prefix="labmesh-bench-") as tmp:
        log_dir = Path(tmp) / "logs"
        log_dir.mkdir()
        plesty_dir = Path(tmp) / "plesty-cwd"  # PLESTY writes logs/ into its working directory
        plesty_dir.mkdir()
        max_s = str(counts.run_limit_s * 10 + 60)
        specs, plesty_note = server_specs(args, max_s, str(plesty_dir))
        print(plesty_note, file=sys.stderr)
        # Servers and clients import a copy of labmesh taken now, so every round of this run
        # measures the same code even while someone edits services/.
        shutil.copytree(
            REPO / "services" / "labmesh",
            Path(tmp) / "src" / "labmesh",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        env = child_env(Path(tmp) / "src")
        bench = Bench(
            counts, log_dir, Path(args.profile_dir) if args.profile_dir else None, env, windows
        )
        by_key: dict[str, list[ServerResult]] = {spec.key: [] for spec in specs}
        try:
            bench.start_workers(max(CONCURRENCY))
            for round_no in range(counts.rounds):
                # Rotate the order each round so no server always runs first (or last).
                shift = round_no % len(specs)
                for spec in specs[shift:] + specs[:shift]:
                    print(
                        f"round {round_no + 1}/{counts.rounds}: {spec.label} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    by_key[spec.key].append(bench.measure(spec, round_no))
            stacks = (
                stacks_bench(
                    peers,
                    env,
                    log_dir,
                    counts.latency_calls,
                    counts.latency_warmup,
                    counts.rounds,
                )
                if peers.python and (peers.tango or peers.caproto)
                else None
            )
            discovery = None if args.no_discovery else DiscoveryBench(bench, counts, dcounts).run()
            laplace = (
                None
                if args.no_laplace
                else laplace_bench(
                    args.interop_python,
                    env,
                    log_dir,
                    QUICK_LAPLACE_COUNTS if args.quick else DEFAULT_LAPLACE_COUNTS,
                )
            )
            subscriptions = (
                None
                if args.no_subscriptions
                else subscriptions_bench(
                    env, *(QUICK_SUBSCRIPTIONS if args.quick else (1000, 10.0, 10.0)), peers=peers
                )
            )
            idle = None if args.no_idle else idle_bench(env, 5.0 if args.quick else 20.0)
            security = (
                None
                if args.no_security
                else security_bench(env, *((300, 1) if args.quick else (counts.latency_calls,)))
            )
        finally:
            bench.stop_workers()
        results = [combine(by_key[spec.key]) for spec in specs]

    floor = results[0]
    if stacks is not None:
        stacks_add_floor(stacks, None if floor.error else floor.latency)
    plesty = next((r for r in results if r.key == "plesty"), None)
    window = windows[0]
    targets = evaluate_targets(results, floor, plesty, window) if not floor.error else []
    if discovery is not None:
        targets += discovery_targets(discovery, floor)
    if laplace is not None:
        targets += laplace_targets(laplace)
    if subscriptions is not None:
        targets += subscription_targets(subscriptions)
    if security is not None:
        targets += security_targets(security)
    if idle is not None:
        targets += idle_targets(idle)
    import zmq

    meta = {
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "quick": args.quick,
        "counts": {
            "latency_calls": counts.latency_calls,
            "calls_per_client": counts.calls_per_client,
            "rounds": counts.rounds,
            "capacity_requests_per_generator": counts.capacity_requests,
            "capacity_limit_s": counts.capacity_limit_s,
            "capacity_windows": list(windows),
            "discovery": None if args.no_discovery else dataclasses.asdict(dcounts),
        },
        "plesty": plesty_note,
        "peers": peers.as_dict(),
        "labmesh_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "elapsed_s": round(time.monotonic() - started, 1),
        "profiled": bool(args.profile_dir),
    }
    print()
    print(
        f"labmesh bench: Python {meta['python']}, pyzmq {meta['pyzmq']} (libzmq "
        f"{meta['libzmq']}), {meta['cpus']} CPUs, labmesh {meta['labmesh_commit']}, "
        f"127.0.0.1; latency over "
        f"{counts.latency_calls} sequential queries, throughput with "
        f"{'/'.join(str(counts.calls_per_client[c]) for c in CONCURRENCY)} calls per client "
        f"for 1/4/16 clients; median of {counts.rounds} rounds; (x) = ratio to the floor; "
        "CPU = per call with 1 client / with 16 clients."
    )
    print()
    print("client library (1/4/16 client processes, each running build_client(...).query):")
    print()
    print(markdown_table(results, floor))
    print()
    gens = max(CONCURRENCY)
    for w in windows:
        print(
            f"server capacity ({gens} load generators): {gens} processes, each a raw DEALER "
            f"keeping up to {w} pre-encoded native queries in flight, "
            f"{counts.capacity_requests} per generator (at most {counts.capacity_limit_s:g} s), "
            "counting only replies checked correct (floor: its id; labmesh: its id and status "
            f"ok; PLESTY, which echoes no id: status ok); window {w}:"
        )
        print()
        print(capacity_table(results, floor, plesty, w))
        print()
    if stacks is not None:
        print(stacks_report(stacks))
        print()
    elif not args.no_peers:
        print(peers.note)
        print()
    if discovery is not None:
        print(discovery_report(discovery, floor, counts, dcounts))
        print()
    if laplace is not None:
        print(laplace_report(laplace))
        print()
    if subscriptions is not None:
        print(subscription_report(subscriptions))
    if security is not None:
        print()
        print(security_report(security))
    if idle is not None:
        print()
        print(idle_report(idle))
        print()
    print(
        "targets (throughput ones on both tables: 'client library' = the first table, "
        "'server capacity' = the load-generator one):"
    )
    print()
    print(targets_table(targets))
    print()
    ceiling = (
        _rps(floor, 16) / _rps(plesty, 16)
        if plesty and _rps(plesty, 16) and _rps(floor, 16)
        else None
    )
    if ceiling is not None and ceiling < TARGET_TPUT16_VS_PLESTY:
        assert plesty is not None
        print(
            f"Note (client library): the floor itself reaches only {ceiling:.2f}x "
            f"{plesty.label} with 16 clients here: the 16 client processes share the "
            f"{os.cpu_count()} CPUs with the server, so no server can reach "
            f"{TARGET_TPUT16_VS_PLESTY}x in that table on this machine."
        )
    meta["floor_vs_plesty_16_clients"] = round(ceiling, 2) if ceiling else None
    cap_floor, cap_plesty = _cap(floor, window), _cap(plesty, window)
    cap_ceiling = cap_floor / cap_plesty if cap_floor and cap_plesty else None
    meta["floor_vs_plesty_capacity"] = round(cap_ceiling, 2) if cap_ceiling else None
    if cap_ceiling is not None and cap_ceiling < TARGET_CAPACITY_VS_PLESTY:
        assert plesty is not None
        print(
            f"Note (server capacity): the floor itself reaches only {cap_ceiling:.2f}x "
            f"{plesty.label} with the load generators."
        )
    floor_run = floor.capacity.get(window) if not floor.error else None
    if floor_run:
        busy = floor_run["server_cores_busy"]
        print(
            f"Note (server capacity): the floor's echo server was {busy:.2f} cores busy at "
            f"{floor_run['server_cpu_us_per_call']:.0f} us CPU per request while the "
            f"generators spent {floor_run['generator_cpu_us_per_call']:.0f} us per request"
            + (
                ": the generators (sharing the CPUs), not the echo server, limit the floor "
                "there, so ratios to the floor in that table overstate the other servers."
                if busy < 0.9
                else "."
            )
        )
    if plesty is not None and not plesty.error:
        theirs = plesty.throughput[16]["server_cpu_us_per_call"]
        theirs_cap = plesty.capacity[window]["server_cpu_us_per_call"]
        for r in results:
            if not r.key.startswith("labmesh") or r.error:
                continue
            mine = r.throughput[16]["server_cpu_us_per_call"]
            mine_cap = r.capacity[window]["server_cpu_us_per_call"]
            if not mine or not mine_cap:  # under one clock tick (10 ms) in a --quick run
                continue
            print(
                f"Server CPU per request, 16 clients / capacity run: {r.label} {mine:.0f} / "
                f"{mine_cap:.0f} us, {plesty.label} {theirs:.0f} / {theirs_cap:.0f} us "
                f"({theirs / mine:.1f}x / {theirs_cap / mine_cap:.1f}x less)."
            )
    print(plesty_note)
    if load_before is not None and load_before > 0.5:
        print(
            f"Warning: the 1-minute load average was {load_before:.2f} before the run; "
            "other work on this machine makes these figures noisy."
        )
    print(
        f"elapsed {meta['elapsed_s']} s"
        + ("  (PROFILED: py-spy attached)" if args.profile_dir else "")
    )
    if args.json or args.plot:
        doc = {
            "meta": meta,
            "servers": {
                r.key: {
                    "label": r.label,
                    "latency": r.latency,
                    "throughput": {str(c): v for c, v in r.throughput.items()},
                    "cpu_us_per_call_1_client": r.cpu_us_per_call,
                    "capacity": {str(w): v for w, v in r.capacity.items()},
                    "error": r.error,
                }
                for r in results
            },
            "peer_stacks": stacks,
            "discovery": discovery,
            "laplace": laplace,
            "subscriptions": subscriptions,
            "security": security,
            "idle": idle,
            "targets": targets,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        if args.plot:
            try:
                print(f"latency distributions: {plot_latency(doc, Path(args.plot))}")
            except ImportError:
                print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
            except ValueError as exc:
                print(f"no plot: {exc}")
    failed_discovery = discovery is not None and (
        "error" in discovery["lookup"] or any("error" in run for run in discovery["capacity"])
    )
    failed_laplace = laplace is not None and any(
        "error" in run for run in laplace["servers"].values()
    )
    failed_subscriptions = subscriptions is not None and any(
        "error" in run for run in subscriptions["systems"].values()
    )
    failed_security = security is not None and any(
        "error" in run for run in security["systems"].values()
    )
    failed_stacks = stacks is not None and any("error" in run for run in stacks["systems"].values())
    failed = (
        failed_discovery
        or failed_laplace
        or failed_subscriptions
        or failed_security
        or failed_stacks
    )
    return 1 if any(r.error for r in results) or failed else 0


def _peer_stacks(args: argparse.Namespace) -> PeerStacks:
    """The peer stacks this run measures: none with --no-peers; with --build-peers the peers'
    virtualenv is built first if it is missing (bounded; a failure is reported, not fatal)."""
    if args.no_peers:
        return PeerStacks(None, note="peer stacks (PyTango, caproto, pyepics) skipped: --no-peers")
    if args.build_peers and args.peers_python is None:
        print("building the peers' virtualenv (scripts/peers_env.py) ...", file=sys.stderr)
        try:
            built = subprocess.run(
                [sys.executable, str(PEERS_ENV_SCRIPT)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            if built.returncode != 0:
                print(f"peers not built: {built.stderr.strip()[-600:]}", file=sys.stderr)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"peers not built: {exc}", file=sys.stderr)
    return find_peer_stacks(args.peers_python)
