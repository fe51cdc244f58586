"""Build the labmesh container image (services/Dockerfile), online or fully offline.

    python scripts/build_image.py                       # public base, pip inside the build
    python scripts/build_image.py --wheelhouse          # public base, wheels built on this host
    python scripts/build_image.py --offline             # debootstrap base + host wheelhouse
    python scripts/build_image.py --offline --tag labmesh:lab   # any tag (default labmesh:latest)

`--offline` needs no registry at all: the base image is made with debootstrap from Debian's
archive, with bookworm-security and bookworm-updates applied, and imported with `docker import`
(cached as labmesh-base:bookworm; made again when older than BASE_MAX_AGE_DAYS, so security
fixes reach new images, or at once with `--refresh-base`). pip inside the build installs only
from a wheelhouse made on this host for the image's Python (3.11, whatever Python runs this
script): labmesh's own wheel (pure Python) and the binary wheels of its dependencies for
CPython 3.11 on manylinux, downloaded from PyPI. This is how the system tests build the image;
`ensure_test_image()` reuses an image whose inputs (the Dockerfile, the package's source, the
base image) are unchanged, found by a digest in its tag.

The image is labelled with the OCI annotations `org.opencontainers.image.version` (labmesh's
version) and `.revision` (the git commit of the source, when known).

The build context is a tar stream made here (the files .dockerignore lets through, plus
`wheelhouse/`), so nothing is written into the repository. Prints the image tag on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: The repository root, found from this file (never an absolute machine path).
REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = "services/Dockerfile"
#: The public base users build on.
PUBLIC_BASE = "python:3.11-slim-bookworm"
#: The imported debootstrap base (offline builds and tests).
DEBOOTSTRAP_BASE = "labmesh-base:bookworm"
#: Debian packages of the debootstrap base: Python with venv (its bundled pip builds the
#: virtualenv in the build stage only), libusb for pyusb.
DEBOOTSTRAP_PACKAGES = ("python3", "python3-venv", "libusb-1.0-0")
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
#: The debootstrap base is made again (with the archive's current security fixes) when older.
BASE_MAX_AGE_DAYS = 7
#: The image's Python (DEBIAN_SUITE's python3; python:3.11-slim-bookworm's too): the
#: wheelhouse holds wheels for it, whatever Python runs this script.
IMAGE_PYTHON = "3.11"
#: The oldest and newest glibc (manylinux_2_X) the base runs wheels of: bookworm has 2.36.
MANYLINUX_GLIBC = (17, 36)
#: Tags of test images start with this; older ones are removed after a new one is built.
TEST_TAG_PREFIX = "labmesh:test-"
#: pip extras installed in the image.
EXTRAS = "sim"
#: Bounds (seconds) of the slow steps.
DEBOOTSTRAP_TIMEOUT_S = 900
WHEEL_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 900


class BuildError(RuntimeError):
    """A step of the image build failed; the message says which and shows its output."""


def _run(cmd: list[str], *, timeout: float, what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, **kwargs)
    except FileNotFoundError:
        raise BuildError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what}: no result after {timeout:.0f} s ({' '.join(cmd)})") from None
    if proc.returncode != 0:
        out = (proc.stdout or b"")[-3000:].decode(errors="replace")
        err = (proc.stderr or b"")[-3000:].decode(errors="replace")
        raise BuildError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{out}\n{err}")
    return proc


def _inspect(ref: str, field: str) -> str | None:
    """One field of a local image (docker image inspect --format), None when there is none."""
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", f"{{{{.{field}}}}}", ref],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_id(ref: str) -> str | None:
    """The ID of a local image, or None when there is none of that name."""
    return _inspect(ref, "Id")


def image_age_days(ref: str) -> float | None:
    """How old the local image `ref` is (days since it was made), None if it is missing."""
    created = _inspect(ref, "Created")
    if created is None:
        return None
    # e.g. 2026-12-06T07:12:03.123456789Z: seconds are enough
    stamp = datetime.datetime.strptime(created[:19], "%Y-%m-%dT%H:%M:%S")
    stamp = stamp.replace(tzinfo=datetime.UTC)
    return (datetime.datetime.now(datetime.UTC) - stamp).total_seconds() / 86400


def sources_list(mirror: str = DEBIAN_MIRROR, security: str = DEBIAN_SECURITY_MIRROR) -> str:
    """The base's apt sources: the release, its point updates and its security fixes."""
    return (
        f"deb {mirror} {DEBIAN_SUITE} main\n"
        f"deb {mirror} {DEBIAN_SUITE}-updates main\n"
        f"deb {security} {DEBIAN_SUITE}-security main\n"
    )


def ensure_debootstrap_base(
    name: str = DEBOOTSTRAP_BASE,
    mirror: str = DEBIAN_MIRROR,
    *,
    refresh: bool = False,
    max_age_days: float = BASE_MAX_AGE_DAYS,
) -> str:
    """Make the base image with debootstrap + docker import (security fixes applied), unless
    `name` exists and is younger than `max_age_days` (and `refresh` is not asked)."""
    age = image_age_days(name)
    if age is not None and age < max_age_days and not refresh:
        return name
    if age is not None:
        print(
            f"build_image: base {name} is {age:.1f} days old"
            + (" (--refresh-base)" if refresh else f" (more than {max_age_days:g})")
            + "; making it again with the current security fixes",
            file=sys.stderr,
        )
    if os.geteuid() != 0:
        raise BuildError(f"debootstrap of {name} needs root")
    with tempfile.TemporaryDirectory(prefix="labmesh-base-") as tmp:
        root = Path(tmp) / "root"
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(DEBOOTSTRAP_PACKAGES)}",
                DEBIAN_SUITE,
                str(root),
                mirror,
            ],
            timeout=DEBOOTSTRAP_TIMEOUT_S,
            what="debootstrap",
        )
        # The suite as debootstrap fetched it lacks the security fixes released since: add
        # bookworm-updates and bookworm-security and upgrade.
        (root / "etc/apt/sources.list").write_text(sources_list(mirror))
        for step in (["apt-get", "update"], ["apt-get", "-y", "upgrade"]):
            _run(
                ["chroot", str(root), *step],
                timeout=DEBOOTSTRAP_TIMEOUT_S,
                what=f"{' '.join(step)} in the base",
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
        # Downloaded .debs, package lists and apt's caches (pkgcache.bin: 77 MB after the
        # update) are only weight in an image.
        for junk in ("var/cache/apt", "var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / junk).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            _run(
                [
                    "docker",
                    "import",
                    "--change",
                    'CMD ["/bin/bash"]',
                    "--message",
                    f"debootstrap --variant=minbase {DEBIAN_SUITE} for labmesh",
                    "-",
                    name,
                ],
                timeout=DEBOOTSTRAP_TIMEOUT_S,
                what="docker import",
                stdin=tar.stdout,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=60)
    return name


def context_files() -> Iterator[tuple[str, Path]]:
    """(name in the context, file) for everything the Dockerfile copies, in a stable order."""
    yield ".dockerignore", REPO_ROOT / ".dockerignore"
    yield DOCKERFILE, REPO_ROOT / DOCKERFILE
    yield "pyproject.toml", REPO_ROOT / "pyproject.toml"
    yield "README.md", REPO_ROOT / "README.md"
    package = REPO_ROOT / "services" / "labmesh"
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            yield path.relative_to(REPO_ROOT).as_posix(), path


def inputs_digest(base_image_id: str, extras: str = EXTRAS) -> str:
    """sha256 over the build's inputs: context files (names and bytes), base image, extras.

    The dependencies' versions are not part of it (they are resolved when the wheelhouse is
    built): rebuild with `--force` to pick up new releases."""
    digest = hashlib.sha256()
    digest.update(f"base={base_image_id}\nextras={extras}\n".encode())
    for name, path in context_files():
        data = path.read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def wheel_platforms(machine: str | None = None) -> list[str]:
    """pip --platform tags of binary wheels the image runs: manylinux for its glibc range."""
    arch = machine or platform.machine()
    low, high = MANYLINUX_GLIBC
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(high, low - 1, -1)]
    return [*tags, f"manylinux2014_{arch}"]


def wheel_download_command(
    requirement: str, dest: Path, python: str = IMAGE_PYTHON, machine: str | None = None
) -> list[str]:
    """pip download of `requirement` and its dependencies as wheels for CPython `python`
    (e.g. "3.11") on manylinux, whatever Python runs pip here."""
    abi = f"cp{python.replace('.', '')}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for tag in wheel_platforms(machine):
        cmd += ["--platform", tag]
    return [*cmd, "--dest", str(dest), requirement]


def build_wheelhouse(dest: Path, extras: str = EXTRAS, python: str = IMAGE_PYTHON) -> list[str]:
    """Wheels of labmesh (built from a copy of the context files) and all its dependencies,
    for the image's Python `python`, not the one running this."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="labmesh-src-") as tmp:
        # pip builds a local project in place (build/, *.egg-info): build a copy instead.
        for name, path in context_files():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        _run(  # labmesh itself is pure Python: any Python >= 3.11 builds the same wheel
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--wheel-dir",
                str(dest),
                tmp,
            ],
            timeout=WHEEL_TIMEOUT_S,
            what="pip wheel",
        )
    own = sorted(dest.glob("labmesh-*.whl"))
    if not own:
        raise BuildError(f"pip wheel made no labmesh wheel in {dest}")
    _run(
        wheel_download_command(f"{own[-1]}[{extras}]", dest, python),
        timeout=WHEEL_TIMEOUT_S,
        what=f"pip download (wheels for Python {python})",
    )
    return sorted(p.name for p in dest.glob("*.whl"))


def context_tar(wheelhouse: Path | None) -> bytes:
    """The build context as an uncompressed tar: context files plus wheelhouse/*.whl."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, path in context_files():
            tar.add(path, arcname=name, recursive=False)
        if wheelhouse is not None:
            for wheel in sorted(wheelhouse.glob("*.whl")):
                tar.add(wheel, arcname=f"wheelhouse/{wheel.name}", recursive=False)
    return buffer.getvalue()


def build_image(
    tag: str,
    base: str = PUBLIC_BASE,
    wheelhouse: Path | None = None,
    extras: str = EXTRAS,
    labels: dict[str, str] | None = None,
) -> str:
    """docker build services/Dockerfile from a tar context; returns the tag."""
    cmd = [
        "docker",
        "build",
        "--force-rm",  # no intermediate containers left behind by a failed step
        "--file",
        DOCKERFILE,
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"EXTRAS={extras}",
        "--tag",
        tag,
    ]
    for key, value in source_version().items():
        cmd += ["--build-arg", f"{key}={value}"]
    for key, value in (labels or {}).items():
        cmd += ["--label", f"{key}={value}"]
    cmd.append("-")
    _run(cmd, timeout=BUILD_TIMEOUT_S, what="docker build", input=context_tar(wheelhouse))
    return tag


def source_version() -> dict[str, str]:
    """VERSION (labmesh's) and REVISION (the git commit, "unknown" outside a checkout) for
    the image's OCI labels."""
    text = (REPO_ROOT / "services" / "labmesh" / "version.py").read_text()
    version = text.split("__version__", 1)[1].split('"')[1] if "__version__" in text else "0"
    try:
        revision = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except OSError:
        revision = ""
    return {"VERSION": version, "REVISION": revision or "unknown"}


def remove_stale_test_images(keep: str) -> None:
    """Delete labmesh:test-* images other than `keep` (each build leaves one behind)."""
    listing = subprocess.run(
        ["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", "labmesh"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    stale = [
        ref for ref in listing.stdout.split() if ref.startswith(TEST_TAG_PREFIX) and ref != keep
    ]
    if stale:
        subprocess.run(["docker", "image", "rm", *stale], capture_output=True, timeout=120)


def ensure_test_image(force: bool = False) -> str:
    """The offline-built image for the system tests, built only when its inputs changed."""
    base = ensure_debootstrap_base()
    base_id = image_id(base)
    assert base_id is not None
    digest = inputs_digest(base_id)
    tag = f"{TEST_TAG_PREFIX}{digest[:16]}"
    if image_id(tag) and not force:
        return tag
    with tempfile.TemporaryDirectory(prefix="labmesh-wheels-") as tmp:
        build_wheelhouse(Path(tmp))
        build_image(tag, base, Path(tmp), labels={"io.labmesh.inputs": digest})
    remove_stale_test_images(keep=tag)
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="labmesh:latest", help="image tag (default %(default)s)")
    parser.add_argument(
        "--base", help=f"base image (default {PUBLIC_BASE}; with --offline: {DEBOOTSTRAP_BASE})"
    )
    parser.add_argument(
        "--wheelhouse", action="store_true", help="build wheels on this host, install only those"
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help=f"no registry: debootstrap base ({DEBOOTSTRAP_BASE}) and --wheelhouse",
    )
    parser.add_argument("--extras", default=EXTRAS, help="pip extras (default %(default)s)")
    parser.add_argument(
        "--refresh-base",
        action="store_true",
        help=f"with --offline: make {DEBOOTSTRAP_BASE} again now (security fixes), not only "
        f"when older than {BASE_MAX_AGE_DAYS} days",
    )
    parser.add_argument(
        "--wheels-only",
        metavar="DIR",
        type=Path,
        help=f"only make the wheelhouse (for Python {IMAGE_PYTHON}) in DIR, no image",
    )
    args = parser.parse_args(argv)
    try:
        if args.wheels_only is not None:
            wheels = build_wheelhouse(args.wheels_only, args.extras)
            print("\n".join(wheels))
            return 0
        base = args.base or (
            ensure_debootstrap_base(refresh=args.refresh_base) if args.offline else PUBLIC_BASE
        )
        if args.wheelhouse or args.offline:
            with tempfile.TemporaryDirectory(prefix="labmesh-wheels-") as tmp:
                wheels = build_wheelhouse(Path(tmp), args.extras)
                print(f"wheelhouse: {len(wheels)} wheels", file=sys.stderr)
                build_image(args.tag, base, Path(tmp), args.extras)
        else:
            build_image(args.tag, base, None, args.extras)
    except BuildError as exc:
        print(f"build_image: {exc}", file=sys.stderr)
        return 1
    print(args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
