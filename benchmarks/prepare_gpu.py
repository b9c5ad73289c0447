"""Prepare a GPU run from a fresh checkout: download the wheels of Corolla's dependencies that the device machine
lacks, or has at another version, into .whl/, and print the line that installs them there.

The device machines (kinds nvidia-h200, -x2, -x4, -x8) reach no package index. Their image has Python 3.12,
torch 2.11 and transformers 5.17; Corolla needs transformers 5.24.0, hivemind 1.1.12 and more. This script
reads pyproject.toml's dependencies (and, with --extras, the api or test extra's), follows each downloaded
wheel's own requirements, compares them with the machine's packages (benchmarks/gpu_packages.txt), downloads
what is missing with pip (run it where pip reaches PyPI), and checks the total against the 64 MiB that travel
with a device command, the working tree included.

    .venv/bin/python benchmarks/prepare_gpu.py                    # runtime dependencies and bitsandbytes
    .venv/bin/python benchmarks/prepare_gpu.py --extras api       # also the API's (fastapi, uvicorn)
    .venv/bin/python benchmarks/prepare_gpu.py --use-machines numpy --no-bitsandbytes    # smaller

Then give `.whl` in the device call's carry and start its command with the printed line.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
MACHINE_LIST = Path(__file__).resolve().parent / "gpu_packages.txt"
BUDGET = 64 * 2**20  # a device call carries at most this: the working tree plus its carried paths
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "any"]  # pip matches these tags exactly; bitsandbytes is _2_24 only
# Where the requirements' markers are evaluated: the machine's python3 (3.12.3, Linux, x86-64).
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix"}
# Never carried, whatever the pin: the machine's own build is the one that runs there.
KEEP_MACHINES = {"torch": "its CUDA wheels are hundreds of MiB; GPU runs use the image's torch 2.11.0+cu130"}
# Asked for by a carried wheel, but nothing imports it at run time: not carried.
NOT_NEEDED = {"grpcio-tools": "hivemind compiles its .proto files with it when it is built; nothing imports it"}
# Not in pyproject.toml, but a CUDA server's --quant int8 / nf4 needs it (the version the H100 runs used).
BITSANDBYTES = "bitsandbytes==0.50.2"
MACHINE_CUDA = "130"  # the machine's torch is built for CUDA 13.0: bitsandbytes' other builds are left out
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           ".whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;")


def machine_packages(path: Path) -> dict[str, Version | None]:
    """name -> version there (None: installed, version not recorded), from `name==version` or `name` lines."""
    packages = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = Version(version) if version else None
    return packages


def project_requirements(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        if extra not in project.get("optional-dependencies", {}):
            sys.exit(f"pyproject.toml has no extra {extra!r}")
        lines += project["optional-dependencies"][extra]
    return [r for r in map(Requirement, lines) if applies(r, "")]


def applies(requirement: Requirement, extra: str) -> bool:
    return requirement.marker is None or requirement.marker.evaluate({**TARGET, "extra": extra})


def machine_fits(specifier: SpecifierSet, version: Version | None) -> bool:
    if version is None:
        # Not recorded: the image is recent (2026-11), so a lower bound holds; a pin or an upper bound may not.
        return all(s.operator in (">=", ">") for s in specifier)
    return specifier.contains(version, prereleases=True)


def wheel_requirements(wheel: Path, extras: set[str]) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        metadata = HeaderParser().parsestr(archive.read(name).decode())
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    return [r for r in requirements if any(applies(r, extra) for extra in extras)]


def wheel_version(wheel: Path) -> Version:
    return parse_wheel_filename(wheel.name)[1]


def download(name: str, specifier: SpecifierSet) -> Path | None:
    """A wheel of `name` in .whl/ within `specifier`: one already there, else the newest pip finds (None: none)."""
    for wheel in sorted(WHEELS.glob("*.whl")):
        if parse_wheel_filename(wheel.name)[0] == name and specifier.contains(wheel_version(wheel), True):
            return wheel
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", "-d", folder, f"{name}{specifier}"]
        for platform in PLATFORMS:
            command += ["--platform", platform]
        if subprocess.run(command, capture_output=True).returncode != 0:
            # Some are sources only on PyPI (hivemind's prefetch_generator, varint): build the wheel here. A pure
            # Python one (py3-none-any) installs on the machine too.
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", folder,
                                    f"{name}{specifier}"], capture_output=True, text=True)
            if built.returncode != 0:
                print((built.stderr.strip().splitlines() or [""])[-1], file=sys.stderr)
                return None
        (wheel,) = Path(folder).glob("*.whl")
        if not any(tag.platform == "any" or tag.platform.startswith("manylinux")
                   for tag in parse_wheel_filename(wheel.name)[3]):
            sys.exit(f"{wheel.name} was built for this machine, not for the GPU machine: find another version")
        if name == "bitsandbytes":
            slim_bitsandbytes(wheel, WHEELS / wheel.name)
        else:
            shutil.move(wheel, WHEELS / wheel.name)
    return WHEELS / wheel.name


def slim_bitsandbytes(source: Path, target: Path) -> None:
    """Copy the wheel with only its CPU and the machine's CUDA libraries (not ROCm, XPU, other CUDAs: 38 MiB)."""
    def other_build(path: str) -> bool:
        found = re.search(r"libbitsandbytes_(\w+)\.so$", path)
        return found is not None and found.group(1) not in ("cpu", f"cuda{MACHINE_CUDA}")

    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as slim:
        for info in archive.infolist():
            if other_build(info.filename):
                continue
            data = archive.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # the installer reads the file list from it
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not other_build(line.split(b",")[0].decode()))
            slim.writestr(info, data)


def resolve(requirements: list[tuple[Requirement, str]], machine: dict[str, Version | None], keep: dict[str, str]):
    """From (requirement, who asks for it) pairs, following the carried wheels' own requirements: what to carry
    (name -> wheel), what is not carried although asked for (name -> why) and what the machine's version was
    trusted for (name -> specifier)."""
    specifiers: dict[str, SpecifierSet] = collections.defaultdict(SpecifierSet)
    carried: dict[str, Path] = {}
    kept: dict[str, str] = {}
    trusted: set[str] = set()
    read_extras: dict[str, set[str]] = collections.defaultdict(set)
    queue = collections.deque(requirements)
    while queue:
        requirement, asker = queue.popleft()
        name = canonicalize_name(requirement.name)
        specifiers[name] &= requirement.specifier
        if name in carried:
            if not specifiers[name].contains(wheel_version(carried[name]), True):
                sys.exit(f"conflict: {carried[name].name} is outside {name}{specifiers[name]} ({asker} asks for "
                         f"{requirement}); name versions that agree with --require")
        elif name in machine and machine_fits(specifiers[name], machine[name]):
            if machine[name] is None and specifiers[name]:
                trusted.add(name)
            continue  # the machine's own requirements hold there already
        elif name in keep:
            there = machine.get(name) or "version"
            kept[name] = f"the machine's {there} is used, outside {specifiers[name]}: {keep[name]}"
            continue
        elif name in NOT_NEEDED:
            kept[name] = NOT_NEEDED[name]
            continue
        else:
            wheel = download(name, specifiers[name])
            if wheel is None:
                sys.exit(f"no wheel of {name}{specifiers[name]} for the machine ({asker} asks for {requirement}); "
                         f"name an older {asker.split()[0]} with --require, e.g. --require '{asker.replace(' ', '<')}'")
            carried[name] = wheel
            print(f"  {wheel.name}  (for {asker})", flush=True)
        todo = {"", *requirement.extras} - read_extras[name]  # "": the wheel's own requirements, no extra
        if todo:
            read_extras[name] |= todo
            asker = f"{name} {wheel_version(carried[name])}"
            queue.extend((r, asker) for r in wheel_requirements(carried[name], todo))
    return carried, kept, {name: specifiers[name] for name in trusted - set(carried)}, specifiers


def working_tree_size() -> int:
    """What a device call sends besides the carried paths: tracked and untracked, not ignored, files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((ROOT / path).stat().st_size for path in listed if path and (ROOT / path).is_file())


def exclude_wheels_from_git() -> None:
    exclude = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout.strip())
    exclude = exclude if exclude.is_absolute() else ROOT / exclude
    if "/.whl/" not in (exclude.read_text().split() if exclude.exists() else []):
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a") as file:
            file.write("/.whl/\n")


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", nargs="*", default=[], help="pyproject.toml extras to carry too: api, test")
    parser.add_argument("--no-bitsandbytes", action="store_true", help="leave out bitsandbytes (servers' --quant)")
    parser.add_argument("--use-machines", nargs="*", default=[], metavar="NAME",
                        help="use the machine's version of these packages even outside Corolla's pins (e.g. numpy)")
    parser.add_argument("--require", nargs="*", default=[], metavar="REQUIREMENT",
                        help="more requirements, e.g. an older version of a package whose newest one asks for "
                             "something the index lacks: --require 'selenium<4.53'")
    parser.add_argument("--packages", type=Path, default=MACHINE_LIST,
                        help="the machine's packages, one `name==version` or `name` a line (pip list --format=freeze)")
    args = parser.parse_args()

    machine = machine_packages(args.packages)
    # --require first: its versions then bind what the rest would pick.
    requirements = [(Requirement(r), "--require") for r in args.require]
    requirements += [(r, "pyproject.toml") for r in project_requirements(args.extras)]
    if not args.no_bitsandbytes:
        requirements.append((Requirement(BITSANDBYTES), "servers' --quant"))
    keep = {**KEEP_MACHINES, **{canonicalize_name(n): "--use-machines" for n in args.use_machines}}
    WHEELS.mkdir(exist_ok=True)
    exclude_wheels_from_git()
    print(f"wheels in {WHEELS}:")
    carried, kept, trusted, specifiers = resolve(requirements, machine, keep)

    for stale in sorted(set(WHEELS.glob("*.whl")) - set(carried.values())):
        stale.unlink()  # two versions of one package stop the whole install
        print(f"removed {stale.name} (not needed now)")

    print("\ncarried (the machine's version, if any, in brackets):")
    for name, wheel in sorted(carried.items(), key=lambda item: -item[1].stat().st_size):
        there = f"[{machine[name] or 'installed'}]" if name in machine else "[missing]"
        print(f"  {mib(wheel.stat().st_size):>9}  {name} {wheel_version(wheel)} {there}"
              f"{'  wanted: ' + str(specifiers[name]) if specifiers[name] else ''}")
    for name, note in kept.items():
        print(f"not carried: {name}: {note}")
    if trusted:
        print("assumed to fit (installed there, version not recorded in the package list; check with "
              "`python3 -m pip show NAME` there): " + ", ".join(f"{n}{s}" for n, s in sorted(trusted.items())))

    wheels = sum(wheel.stat().st_size for wheel in carried.values())
    tree = working_tree_size()
    print(f"\n{len(carried)} wheels, {mib(wheels)}; with the working tree ({mib(tree)}): {mib(wheels + tree)} "
          f"of the {mib(BUDGET)} a device call carries")
    if wheels + tree > BUDGET:
        print(f"OVER by {mib(wheels + tree - BUDGET)}. To drop, largest first:")
        for name, wheel in sorted(carried.items(), key=lambda item: -item[1].stat().st_size):
            if name == "bitsandbytes":
                print(f"  {name} ({mib(wheel.stat().st_size)}): --no-bitsandbytes (needed only for --quant on CUDA)")
            elif name in machine and not any(s.operator == "==" for s in specifiers[name]):
                there = machine[name] or "a version not recorded"
                print(f"  {name} ({mib(wheel.stat().st_size)}): --use-machines {name} (the machine has {there}, "
                      f"outside {specifiers[name]}: check that it works there)")
        sys.exit(1)
    print("\nGive `.whl` in the device call's carry and start its command with:\n" + INSTALL)


if __name__ == "__main__":
    main()
