"""scripts/build_image.py and the Dockerfile's build context, with plain files (no Docker)."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("build_image", ROOT / "scripts" / "build_image.py")
assert _spec is not None and _spec.loader is not None
build_image = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_image)


def dockerfile_copy_sources() -> list[str]:
    sources = []
    for line in (ROOT / "services" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from=") for w in words):
            sources += words[1:-1]  # from the build context (not from an earlier stage)
    return sources


def test_dockerignore_lets_through_everything_the_dockerfile_copies():
    allowed = {
        line[1:]
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = dockerfile_copy_sources()
    assert {"pyproject.toml", "README.md", "services/labmesh", "wheelhouse*"} <= set(sources)
    for source in sources:
        assert source.rstrip("*") in allowed, source


def test_context_holds_the_package_and_no_caches():
    names = [name for name, _ in build_image.context_files()]
    assert names[:4] == [".dockerignore", "services/Dockerfile", "pyproject.toml", "README.md"]
    package = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "services" / "labmesh").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert set(names[4:]) == package
    assert "services/labmesh/drivers/sim/pm100.yaml" in package  # package data goes in too
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_context_tar_is_gnu_format_with_the_wheelhouse(tmp_path):
    # Docker 28's CLI does not recognise Python's default (PAX) tar as a build context.
    (tmp_path / "labmesh-0.1.0-py3-none-any.whl").write_bytes(b"wheel")
    (tmp_path / "notes.txt").write_text("not a wheel")
    data = build_image.context_tar(tmp_path)
    assert data[257:265] == b"ustar  \0"  # GNU magic
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert "services/Dockerfile" in names
    assert [n for n in names if n.startswith("wheelhouse/")] == [
        "wheelhouse/labmesh-0.1.0-py3-none-any.whl"
    ]
    without = build_image.context_tar(None)
    with tarfile.open(fileobj=io.BytesIO(without)) as tar:
        assert not [n for n in tar.getnames() if n.startswith("wheelhouse")]


def test_inputs_digest_follows_base_and_extras():
    digest = build_image.inputs_digest("sha256:aaa")
    assert digest == build_image.inputs_digest("sha256:aaa")
    assert digest != build_image.inputs_digest("sha256:bbb")
    assert digest != build_image.inputs_digest("sha256:aaa", extras="")
