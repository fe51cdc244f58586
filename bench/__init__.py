"""Round-trip latency and throughput of labmesh against a raw pyzmq floor and PLESTY's server.

    .venv/bin/python -m bench                  # real numbers (about 6 minutes)
    .venv/bin/python -m bench --quick          # smoke run (a minute or two)
    .venv/bin/python -m bench --json out.json  # also write every figure as JSON
    .venv/bin/python -m bench --profile-dir prof/  # py-spy each server (see --help)

(from the repository root; `scripts/bench.py` runs the same from anywhere). The package:
`common` (paths, counts, server specs), `worker` (client and load-generator processes), `device`
(measuring device servers; tables and targets), `stacks` (the query round trip of PyTango and
Channel Access next to the floor's), `discovery`, `laplace`, `subscriptions` (1,000 parameters at
10 Hz into one client, against a raw PUB/SUB floor and the peer stacks' monitors and change
events), `cli` (the run and the report), and `peers.py` (the servers measured, each run as a
file in its own process).

Peer stacks (skipped with --no-peers, and skipped, saying so, when their virtualenv is missing):
PyTango, caproto and pyepics from PyPI, in `.cache/peers-venv` (built by scripts/peers_env.py,
or first by `python -m bench --build-peers`; the older `.cache/epics-venv` still serves for
Channel Access alone). PyTango runs without a database (`-nodb`, ORB endpoint
giop:tcp:127.0.0.1:PORT); every peer server is checked from /proc to listen on loopback only.

What is measured, the same way for every server:
- floor: a raw pyzmq ROUTER that echoes each message (bench/peers.py echo), driven by a
  raw DEALER that sends a JSON body shaped and sized like labmesh's query (type, param,
  timeout, id, session) and decodes the reply and checks its id, as any real client must;
- labmesh: DeviceServer with an in-memory device (fixed_threading True and False), driven by
  `build_client(...).query("X")`;
- PLESTY: plesty_lib's own server with the same in-memory device, run by the interop
  virtualenv's Python (`.cache/interop-venv`, built by scripts/interop_env.py), driven by
  labmesh's client (wire compatible). Skipped, saying so, when that virtualenv is missing.

Two throughput tables:
- client library: 1, 4 and 16 client processes each running the full client above. Each such
  client spends about 100 us CPU per call, so on a small machine the 16 clients, not the
  server, are the limit (the floor itself then reaches only about 3x PLESTY).
- server capacity: 16 lightweight load generators (the same worker processes), each a raw
  DEALER that connects like labmesh's client (keeping the session the server grants; a made-up
  one of the same size for the floor), then sends pre-encoded native queries, exactly the
  bytes labmesh's client sends for `query("X")` (prefix + counter + suffix), keeping up to 4
  in flight (`--capacity-windows`). A reply counts only if it checks out by bytes search:
  labmesh: status ok and the id of a request in flight; floor: the id (its echo has no
  status); PLESTY: status ok only, as it echoes no id. PLESTY answers each request in its own
  task, so pipelining works with it (every reply ok, none lost); its replies might come back
  in another order, which cannot matter as every request is the same query. So all servers
  use the same window; `--capacity-windows 1,4` adds a window-1 table for comparison. Fixed
  request count per generator and a hard time limit (a run cut short says "capped"). The table
  also gives the server's and the generators' CPU per request and how many cores the server
  kept busy, which tell whether the server or the generators were the limit.

Discovery (skipped with --no-discovery): `labmesh discovery`, the real command, in its own process
(127.0.0.1, no beacon):
- lookup round trip: one client process making sequential `lookup` requests for one name among
  1,000 registered records, both with the floor's bare DEALER and with labmesh's
  `Resolver.lookup`, as a ratio to the floor's query round trip of the same run (target: the
  Resolver's p50 <= 2x);
- registry capacity: 5,000 device records kept alive at 1 Hz (TTL 3 s: the registrar
  heartbeats every TTL/3) by 4 load-generator processes, each simulated server with its own
  connection: 5,000 single-device servers sending one heartbeat request each, and 500
  `labmesh serve` hosts of 10 devices sending one batched heartbeat each (as the registrar
  does). Over a fixed 20 s window: heartbeats/s achieved, the discovery process's CPU from
  /proc (target: < 50% of one core) and whether any registration expired (none may).
  `--quick`: 500 records, 5 s.

LAPLACE-LHC (skipped with --no-laplace): GET round trip against the real laplace-server
ServerLHC (interop virtualenv) in the same run: the ServerLHC, labmesh's LaplaceServer serving the
same data, a simulated MotorStage behind a LaplaceAdapter and a floor (a bare pyzmq REP socket
with a fixed reply), each in its own process, timed by one REQ client sending the LAPLACE
master's bytes: back to back (servers interleaved), then sparse, polling every server every
300 ms on average as the master does (targets: LaplaceServer p50 <= ServerLHC's p50; sparse GET
p99 < 1 ms). `--quick`: 300 GETs, 10 polls; default 5,000 GETs, 300 polls (90 s).

Every server runs alone in its own process; every client runs in its own process (a pool of
worker processes started once and reused, so the layout is identical for every server). A
latency run is one client making sequential calls; a throughput run is 1, 4 or 16 clients
each making a fixed number of calls, started together once all are connected and warmed up;
throughput = all calls / (last end - first start), for a capacity run too. Warm-up calls are
never timed. Server and client CPU time per request come from /proc and
`time.process_time`. Each figure is the median of several rounds, the servers taking turns in
a rotating order; servers and clients import a copy of labmesh taken at the start. Everything
listens on 127.0.0.1, every wait is bounded, and every process this script starts is ended by
its PID. Exit status 1 means a server could not be measured; missed targets are reported, not
failed.
"""
