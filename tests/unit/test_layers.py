"""The layering of labmesh as a tested contract: imports run downward only, never in a circle,
and the pure layers load no I/O library.

Read from the source with `ast` (module-level and function-level imports; imports under
`if TYPE_CHECKING:` are annotations, not dependencies). A new module must be given a layer here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SOURCE = Path(__file__).resolve().parents[2] / "services"

#: Lower layers never import higher ones (ARCHITECTURE.md, "Layers").
LAYERS: dict[str, int] = {
    # protocol and helpers: pure
    "labmesh": 0,
    "labmesh.version": 0,
    "labmesh.lazy": 0,
    "labmesh.logbudget": 0,
    "labmesh.hints": 0,
    "labmesh.protocol": 0,
    "labmesh.protocol.errors": 0,
    "labmesh.protocol.codec": 0,
    "labmesh.protocol.native": 0,
    "labmesh.protocol.laplace": 0,
    "labmesh.protocol.exchange": 0,
    "labmesh.protocol.topics": 0,
    # device contract, locks, registry: pure
    "labmesh.device": 1,
    "labmesh.device.parameters": 1,
    "labmesh.device.base": 1,
    "labmesh.device.executor": 1,
    "labmesh.device.tasks": 1,
    "labmesh.locks": 1,
    "labmesh.access": 1,
    "labmesh.discovery.registry": 1,
    "labmesh.compat": 1,
    "labmesh.compat.plesty": 1,
    # the server's decisions: pure; sockets and metrics made in one place each
    "labmesh.server.core": 2,
    "labmesh.server.tasks": 2,
    "labmesh.server.subscriptions": 2,
    "labmesh.transport": 2,
    "labmesh.security": 2,
    "labmesh.audit": 2,
    "labmesh.userstate": 2,
    "labmesh.metrics": 2,
    "labmesh.signals": 2,
    # transport: sockets, threads, asyncio; drivers
    "labmesh.server": 3,
    "labmesh.server.loop": 3,
    "labmesh.client": 3,
    "labmesh.updates": 3,
    "labmesh.discovery": 3,
    "labmesh.discovery.beacon": 3,
    "labmesh.discovery.resolver": 3,
    "labmesh.discovery.registrar": 3,
    "labmesh.discovery.service": 3,
    "labmesh.drivers": 3,
    "labmesh.drivers.visa": 3,
    "labmesh.drivers.scpi": 3,
    "labmesh.drivers.powermeter": 3,
    "labmesh.drivers.nidaq": 3,
    "labmesh.drivers.motor": 3,
    # compatibility with the peers
    "labmesh.compat.laplace": 4,
    "labmesh.compat.laplace.adapter": 4,
    "labmesh.compat.laplace.server": 4,
    "labmesh.compat.laplace.qt": 4,
    "labmesh.laplace": 4,
    "labmesh.laplace_qt": 4,
    "labmesh.ophyd": 4,
    # one process per instrument PC
    "labmesh.config": 5,
    "labmesh.keys": 5,
    "labmesh.host": 5,
    "labmesh.prometheus_config": 5,
    # commands
    "labmesh.cli": 6,
    "labmesh.demo": 6,
}
PURE = {name for name, layer in LAYERS.items() if layer < 2} | {
    "labmesh.server.core",
    "labmesh.server.tasks",
    "labmesh.server.subscriptions",
}
IO_LIBRARIES = ("zmq", "asyncio", "prometheus_client")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SOURCE / "labmesh").rglob("*.py")):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Every module `name` imports (absolute names), outside `if TYPE_CHECKING:` blocks."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == (
                "TYPE_CHECKING"
            ):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {
        name: {i for i in imports_of(name, path) if i in found and i != name}
        for name, path in found.items()
    }


def test_every_module_has_a_layer(graph):
    assert sorted(set(graph) - set(LAYERS)) == [], "give new modules a layer in LAYERS"


def test_imports_run_downward_only(graph):
    upward = [
        f"{name} (layer {LAYERS[name]}) imports {target} (layer {LAYERS[target]})"
        for name, targets in graph.items()
        for target in sorted(targets)
        if name in LAYERS and target in LAYERS and LAYERS[target] > LAYERS[name]
    ]
    assert upward == []


def test_no_import_cycles(graph):
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def test_pure_layers_import_no_io_library(graph):
    direct = {
        name: sorted(i for i in imports_of(name, path) if i.split(".")[0] in IO_LIBRARIES)
        for name, path in modules().items()
        if name in PURE
    }
    assert {name: libs for name, libs in direct.items() if libs} == {}
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in sorted(PURE))
        + f"bad = [m for m in {IO_LIBRARIES!r} if m in sys.modules]\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compatibility_code_uses_no_private_attribute_of_another_object():
    """compat/ talks to the server through its documented interface (docs/server.md), never
    through another object's private attributes (`server._stopped`, `core._queue`, ...)."""
    found = []
    for name, path in modules().items():
        if not (
            name.startswith("labmesh.compat") or name in ("labmesh.laplace", "labmesh.laplace_qt")
        ):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{name}:{node.lineno} .{node.attr}")
    assert found == []
