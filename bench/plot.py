"""A PNG of the latency distributions of one bench run, per system (matplotlib).

    .venv/bin/python -m bench --json results.json --plot latency.png
    .venv/bin/python -m bench.plot results.json latency.png   # from a saved run

One panel per round trip the run measured: a device query (the raw pyzmq floor, labmesh in
both threading modes, PLESTY and the other peers that ran), a LAPLACE-LHC GET back to back
(the bare REP floor, ServerLHC, labmesh) and a discovery lookup. Each curve is the share of
calls answered within a time (the 1st to 99th percentiles the bench records), on a log time
axis, so a curve further left is faster and a longer right tail is a worse p99. matplotlib is
the `bench` extra (`pip install -e ".[bench]"`); without it the bench says so and skips the plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: the share of calls each recorded percentile stands for (1% ... 99%)
SHARES = [q / 100 for q in range(1, 100)]


def panels(doc: dict[str, Any]) -> list[tuple[str, list[tuple[str, list[float]]]]]:
    """(title, [(label, percentiles_us)]) for each round trip with distributions in `doc`."""
    out: list[tuple[str, list[tuple[str, list[float]]]]] = []
    query = [
        (server["label"], server["latency"]["percentiles_us"])
        for server in doc.get("servers", {}).values()
        if server.get("latency") and server["latency"].get("percentiles_us")
    ]
    stacks = (doc.get("peer_stacks") or {}).get("systems", {})
    for stack in stacks.values():  # PyTango, caproto, pyepics, when the peers venv ran
        if stack.get("percentiles_us"):
            query.append((stack["label"], stack["percentiles_us"]))
    if query:
        out.append(("device query round trip (1 client)", query))
    laplace = (doc.get("laplace") or {}).get("servers", {})
    lap = [
        (run.get("label", key), run["back_to_back"]["percentiles_us"])
        for key, run in laplace.items()
        if run.get("back_to_back", {}).get("percentiles_us")
    ]
    if lap:
        out.append(("LAPLACE-LHC GET, back to back", lap))
    lookup = ((doc.get("discovery") or {}).get("lookup") or {}).get("clients", {})
    look = [
        (run["label"], run["percentiles_us"])
        for run in lookup.values()
        if run.get("percentiles_us")
    ]
    if look:
        out.append(("discovery lookup (1000 records)", look))
    return out


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Draw the run's latency distributions into the PNG at `path`; returns it.

    Raises ImportError without matplotlib, ValueError when the run recorded no distribution.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: a file, never a window
    import matplotlib.pyplot as plt

    found = panels(doc)
    if not found:
        raise ValueError("the run recorded no latency distribution (an older bench JSON?)")
    fig, axes = plt.subplots(1, len(found), figsize=(6.2 * len(found), 4.6), squeeze=False)
    for ax, (title, curves) in zip(axes[0], found, strict=True):
        for label, percentiles in curves:
            style = "--" if label.startswith("floor") else "-"
            ax.plot(percentiles, SHARES, style, label=label, linewidth=1.6)
        ax.set_xscale("log")
        ax.set_xlabel("round trip (us, log scale)")
        ax.set_ylabel("share of calls answered within")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    meta = doc.get("meta", {})
    fig.suptitle(
        f"labmesh bench, {meta.get('date', 'date not recorded')}: labmesh "
        f"{meta.get('labmesh_commit', '?')}, Python {meta.get('python', '?')}, "
        f"{meta.get('cpus', '?')} CPUs ({meta.get('machine', '?')}), 127.0.0.1",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a bench JSON (python -m bench --json ...)")
    parser.add_argument("png", type=Path, help="where to write the plot")
    args = parser.parse_args(argv)
    try:
        doc = json.loads(args.results.read_text())
        print(plot(doc, args.png))
    except ImportError:
        print("matplotlib is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"cannot plot {args.results}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
