"""The docs tier: every code block marked `runnable` in README.md and docs/*.md runs, as
written, against a live `labmesh demo` (bash blocks with the repository's .venv/bin paths
pointing at this interpreter's, Python blocks in a fresh interpreter). A block that fails
fails the tier: the docs stay true."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import running_demo

pytestmark = pytest.mark.docs

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w+) runnable[^\n]*\n(.*?)^```", re.S | re.M)


def runnable_blocks() -> list[tuple[str, str, str]]:
    blocks = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            blocks.append((f"{path.relative_to(REPO)}:{line}", match[1], match[2]))
    return blocks


BLOCKS = runnable_blocks()


def test_the_docs_have_runnable_blocks():
    assert len(BLOCKS) >= 3, BLOCKS
    assert {lang for _, lang, _ in BLOCKS} <= {"bash", "python"}


@pytest.fixture(scope="module")
def lab():
    with running_demo() as demo:
        yield {"LABMESH_DISCOVERY": demo["endpoint"]}


@pytest.mark.parametrize(("where", "lang", "code"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_a_runnable_block_runs(lab, where, lang, code, tmp_path):
    env = {**os.environ, **lab}
    bindir = str(Path(sys.executable).parent)
    if lang == "bash":
        script = code.replace(".venv/bin/", bindir + "/")
        argv = ["bash", "-e", "-o", "pipefail", "-c", script]
    else:
        argv = [sys.executable, "-c", code]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,  # files a block writes (a plot) land in a temporary folder
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (
        f"{where}: the {lang} block failed ({result.returncode})\n{code}\n"
        f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"
    )
