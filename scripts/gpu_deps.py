"""The Python packages the GPU check carries to a machine that reaches no package registry.

    python scripts/gpu_deps.py closure             # name==version of every package to carry
    python scripts/gpu_deps.py check-wheels DIR    # the wheels in DIR: tags, one each, size
    python scripts/gpu_deps.py verify              # on the GPU machine: every requirement met

`closure` walks grpo-ds's runtime requirements (pyproject.toml) through the installed packages'
own metadata, with the markers of the GPU machine (CPython 3.12, Linux x86-64), and pins each
to the version installed here: the combination the CPU test suite runs on. It leaves out
PROVIDED: packages the GPU image holds (torch and its CUDA libraries above all, which must never
be replaced) or that are large compiled ones whose image version serves. `verify` checks there,
after the install, that the whole closure is importable at versions meeting every specifier.
Needs Python >= 3.11 (tomllib) and `packaging`, both on the GPU image.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# The GPU machine: CPython 3.12 on Linux x86-64 (/work/.library/device/KINDS.md).
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "extra": ""}
# glibc of the image is at least 2.35 (Ubuntu 22.04+); wheels for newer glibc are refused.
MANYLINUX = [f"manylinux_2_{n}_x86_64" for n in range(35, 16, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
MAX_MIB = 48  # a run carries at most 64 MiB with the working tree; keep room for it
PROVIDED = {
    # torch and CUDA: the image's build matches its driver; never carried
    "torch", "triton", "setuptools",
    # compiled and large; the image's versions meet our specifiers (numpy 2.5, pyarrow, pandas)
    "numpy", "pandas", "pyarrow", "python-dateutil", "six", "tzdata",
    # tensorboard and its dependencies are on the image
    "tensorboard", "tensorboard-data-server", "grpcio", "protobuf", "markdown", "werkzeug",
    "markupsafe", "absl-py", "pillow",
    # on the image, small, and not constrained by anything we pin
    "sentencepiece", "pyyaml", "psutil", "ninja", "msgpack", "py-cpuinfo", "einops", "tqdm",
    "packaging", "filelock", "sympy", "mpmath", "networkx", "jinja2",
}


def _is_provided(name: str) -> bool:
    return name in PROVIDED or name.startswith(("nvidia-", "cuda-"))


def project_requirements() -> list[Requirement]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [Requirement(r) for r in data["project"]["dependencies"]]


def applies(req: Requirement) -> bool:
    return req.marker is None or Marker(str(req.marker)).evaluate(TARGET_ENV)


def walk() -> dict[str, list[Requirement]]:
    """{canonical name: the requirements on it} over the closure of the project's requirements."""
    seen: dict[str, list[Requirement]] = {}
    todo = [r for r in project_requirements() if applies(r)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        first = name not in seen
        seen.setdefault(name, []).append(req)
        if not first:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # reported by whoever needs it installed
        todo += [r for r in map(Requirement, dist.requires or []) if applies(r)]
    return seen


def closure() -> list[str]:
    """name==version of every package to carry, versions as installed here."""
    pins = []
    for name in sorted(walk()):
        if _is_provided(name):
            continue
        pins.append(f"{name}=={metadata.version(name)}")
    return pins


def check_wheels(folder: Path) -> list[str]:
    """Problems with the wheels in `folder`: a wrong platform or Python, a package twice, a
    package of the closure missing, or too many bytes. Prints a summary line."""
    ok_tags = set(cpython_tags((3, 12), platforms=MANYLINUX))
    ok_tags |= set(compatible_tags((3, 12), "cp312", platforms=MANYLINUX))
    problems, names, total = [], {}, 0
    for wheel in sorted(folder.glob("*.whl")):
        total += wheel.stat().st_size
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if not tags & ok_tags:
            problems.append(f"{wheel.name}: no tag for CPython 3.12 on manylinux x86-64")
        if name in names:
            problems.append(f"{name}: two wheels ({names[name]}, {version}); pip refuses both")
        names[name] = version
    for pin in closure():
        name, version = pin.split("==")
        if names.get(canonicalize_name(name)) != Version(version):
            problems.append(f"{pin}: no wheel for it in {folder}")
    if total > MAX_MIB * 2**20:
        problems.append(f"{total / 2**20:.1f} MiB of wheels: over the {MAX_MIB} MiB allowed")
    print(f"{len(names)} wheels, {total / 2**20:.1f} MiB, all for CPython 3.12 manylinux x86-64"
          if not problems else f"{len(problems)} problem(s) with {folder}")
    return problems


def verify() -> list[str]:
    """Every requirement of the closure met by what this interpreter imports (run after the
    install): the check pip itself would make, limited to what grpo-ds needs."""
    problems = []
    for name, reqs in sorted(walk().items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed (needed by {[str(r) for r in reqs]})")
            continue
        for req in reqs:
            if req.specifier and not req.specifier.contains(installed, prereleases=True):
                problems.append(f"{name} {installed} does not meet {req}")
    return problems


def main(argv: list[str]) -> int:
    if argv[:1] == ["closure"]:
        print("\n".join(closure()))
        return 0
    if argv[:1] == ["check-wheels"] and len(argv) == 2:
        problems = check_wheels(Path(argv[1]))
    elif argv[:1] == ["verify"]:
        problems = verify()
        print("every requirement of grpo-ds is met" if not problems else "unmet requirements:")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
