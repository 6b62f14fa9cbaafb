"""Folder of wheels that installs the job's missing dependencies offline on the lent GPU machine.

    python bench/device_bundle.py --out DIR [--python-version 3.12] [--max-mib 56] [--platform manylinux2014_x86_64 ...]
    sh DIR/install.sh [TARGET]      # on the device: pip install --no-index --no-deps --target TARGET (.device-site)

The packages are the Requires-Dist closure (no extras; markers evaluated for the target: CPython of --python-version on
Linux x86_64) of NEEDS, read from this environment's installed metadata, minus the closure of TARGET_HAS. Versions are
pinned from constraints.txt. Each is downloaded as a binary wheel for the target; one without a binary wheel is built
here with `pip wheel --no-deps` and must come out pure Python (py3-none-any). Ray's wheel is repacked without its Java
jars, JavaScript source maps and the AI libraries the job does not use (RLlib, Data, Serve, Tune, Train, LLM),
its native binaries stripped of the symbols dynamic linking does not need. The folder must stay under --max-mib (it
travels with the repository, 64 MiB in all).
Everything is built in a temporary folder next to --out and moved there only when complete.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, NoReturn

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# What the job imports that the device machine lacks: Ray, DeepSpeed, diffusers, pydantic (config). (PyYAML comes
# with transformers.)
NEEDS = ("ray", "deepspeed", "diffusers", "pydantic")
# What the GPU machine already has (PyTorch with CUDA and the packages its image ships); edit for another machine.
TARGET_HAS = ("torch", "transformers", "peft", "safetensors", "prometheus-client", "psutil", "msgpack", "grpcio",
              "aiohttp", "ninja")
# manylinux2014 = glibc 2.17; the device's torch wheels are manylinux_2_28, so glibc >= 2.28 is there.
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")
MARK = ".device_bundle"  # marks an --out folder as made by this script (so a rerun may replace it)


def log(msg: str) -> None:
    print(f"[device_bundle] {msg}", flush=True)


def fail(msg: str, code: int = 1) -> NoReturn:
    print(f"[device_bundle] error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def normalise(name: str) -> str:
    """PEP 503 name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def target_env(python_version: str) -> dict[str, str]:
    """Marker environment of CPython `python_version` (X.Y) on Linux x86_64, no extra selected."""
    env = dict(default_environment())
    env.update(python_version=python_version, python_full_version=f"{python_version}.0", os_name="posix",
               implementation_name="cpython", implementation_version=f"{python_version}.0", sys_platform="linux",
               platform_python_implementation="CPython", platform_system="Linux", platform_machine="x86_64", extra="")
    return env


def closure(roots: Iterable[str], requires: Callable[[str], list[str]], env: dict[str, str]) -> dict[str, str]:
    """name -> reason ("need", or "via R1, R2": the roots that pull it in) for every package reachable from `roots`
    through Requires-Dist lines (`requires(normalised name)`) whose marker holds in `env`; extras are not followed."""
    roots = [normalise(r) for r in roots]
    via: dict[str, list[str]] = {}
    for root in roots:
        stack, seen = [root], set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            via.setdefault(name, []).append(root)
            for line in requires(name):
                req = Requirement(line)
                if req.marker is None or req.marker.evaluate(env):
                    stack.append(normalise(req.name))
    return {name: "need" if name in roots else "via " + ", ".join(rs) for name, rs in sorted(via.items())}


def installed_requires(name: str) -> list[str]:
    try:
        return metadata.distribution(name).requires or []
    except metadata.PackageNotFoundError:
        fail(f"{name} is not installed in this environment ({sys.executable}); run setup.sh first")


def constraints(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[normalise(name)] = version.strip()
    return pins


def jars_and_maps(package: str) -> Callable[[str], bool]:
    """Drop rule: `package`'s Java jars (package/jars/*) and every JavaScript source map (*.js.map)."""
    return lambda name: name.startswith(f"{package}/jars/") or name.endswith(".js.map")


# Ray's libraries the job never imports (it uses Ray core: tasks, actors, placement groups, the object store).
RAY_LIBRARIES = ("rllib", "data", "serve", "tune", "train", "llm")


def ray_drop(name: str) -> bool:
    """Ray's Java workers (unused by Python jobs), source maps (debugging only) and its AI libraries."""
    return jars_and_maps("ray")(name) or name.startswith(tuple(f"ray/{lib}/" for lib in RAY_LIBRARIES))


def strip_elf(name: str, data: bytes) -> bytes:
    """An ELF binary or shared library without the symbols dynamic linking does not need (`strip --strip-unneeded`,
    as distributions ship their binaries); anything else unchanged."""
    if not data.startswith(b"\x7fELF"):
        return data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "binary"
        path.write_bytes(data)
        done = subprocess.run(["strip", "--strip-unneeded", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            fail(f"strip {name}: {done.stderr.strip()}")
        return path.read_bytes()


def record_line(name: str, data: bytes) -> str:
    """A RECORD line: name, sha256 (urlsafe base64 without padding), size."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def repack_wheel(src: Path, dst: Path, drop: Callable[[str], bool],
                 rewrite: Callable[[str, bytes], bytes] = lambda name, data: data) -> list[str]:
    """Copy wheel `src` to `dst` without the entries `drop` selects, each other entry's bytes passed through
    `rewrite`; *.dist-info/RECORD loses the dropped entries' lines and gets new ones for rewritten entries (the other
    lines unchanged). Every entry keeps its ZipInfo (dates, permission bits), deflated. Returns the dropped names."""
    with zipfile.ZipFile(src) as zin:
        dropped = [info.filename for info in zin.infolist() if drop(info.filename)]
        gone = set(dropped)
        kept = [info for info in zin.infolist() if info.filename not in gone]
        is_record = [re.fullmatch(r"[^/]+\.dist-info/RECORD", info.filename) is not None for info in kept]
        contents, changed = {}, {}
        for info, record in zip(kept, is_record):
            data = zin.read(info)
            contents[info.filename] = data if record else rewrite(info.filename, data)
            if contents[info.filename] != data:
                changed[info.filename] = record_line(info.filename, contents[info.filename])
        with zipfile.ZipFile(dst, "w") as zout:
            for info, record in zip(kept, is_record):
                data = contents[info.filename]
                if record:
                    lines = data.decode().splitlines(keepends=True)
                    names = [next(csv.reader([line]), [""])[0] for line in lines]
                    data = "".join(changed.get(n, line) for n, line in zip(names, lines) if n not in gone).encode()
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return dropped


def pip(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_BUILD_OPS="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run([sys.executable, "-m", "pip", *args], env=env, capture_output=True, text=True)


def fetch_wheel(name: str, version: str, args: argparse.Namespace, into: Path) -> Path:
    """The target's binary wheel of name==version, or a pure-Python one built here when there is none."""
    into.mkdir()
    spec = f"{name}=={version}"
    plats = [a for p in args.platform for a in ("--platform", p)]
    got = pip("download", "--no-deps", "--only-binary=:all:", "--python-version", args.python_version,
              "--implementation", "cp", *plats, "-d", str(into), spec)
    built = got.returncode != 0
    if built:
        if "No matching distribution" not in got.stderr:
            fail(f"pip download {spec} failed:\n{got.stderr.strip()}")
        log(f"{spec}: no binary wheel for the target; building a pure-Python wheel here")
        got = pip("wheel", "--no-deps", "-w", str(into), spec)
        if got.returncode != 0:
            fail(f"pip wheel {spec} failed:\n{got.stderr.strip()}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        fail(f"expected one wheel for {spec}, found {[w.name for w in wheels]}")
    if built and not wheels[0].name.endswith("-py3-none-any.whl"):
        fail(f"{spec} has no binary wheel for the target and the one built here is not pure Python: {wheels[0].name}")
    return wheels[0]


INSTALL_SH = """#!/bin/sh
# Installs this folder's wheels offline: sh install.sh [TARGET] (default .device-site); PYTHON picks the interpreter.
set -e
"${PYTHON:-python}" -m pip install --no-index --no-deps --target "${1:-.device-site}" "$(dirname "$0")"/*.whl
echo "export PYTHONPATH=$(cd "${1:-.device-site}" && pwd)\\${PYTHONPATH:+:\\$PYTHONPATH}"
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to write (replaced when made by this script)")
    ap.add_argument("--python-version", default="3.12", help="target CPython, X.Y")
    ap.add_argument("--max-mib", type=float, default=56.0, help="largest folder size allowed")
    ap.add_argument("--platform", nargs="+", default=list(PLATFORMS), help="target wheel platform tags")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"3\.\d{1,2}", args.python_version):
        ap.error(f"--python-version {args.python_version!r}: expected X.Y, e.g. 3.12")
    if args.max_mib <= 0:
        ap.error("--max-mib must be positive")
    out = args.out
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).exists():
        ap.error(f"--out {out} is a non-empty folder not made by this script; pick another")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = target_env(args.python_version)
    pins = constraints()
    # The device lacks NEEDS even where its packages' metadata here names them (transformers -> typer -> pydantic).
    needs = {normalise(n) for n in NEEDS}
    have = closure(TARGET_HAS, lambda n: [r for r in installed_requires(n)
                                          if normalise(Requirement(r).name) not in needs], env)
    wanted = closure(NEEDS, installed_requires, env)
    chosen = {n: why for n, why in wanted.items() if n not in have}
    missing = sorted(n for n in chosen if n not in pins)
    if missing:
        fail(f"not pinned in constraints.txt: {', '.join(missing)}")
    log(f"{len(chosen)} packages for CPython {args.python_version} (the device has {len(have)}, left out):")
    for name, why in chosen.items():
        log(f"  {name + '==' + pins[name]:<36} {why}")
    log("left out, the device has them: " + ", ".join(
        f"{n} ({'listed' if have[n] == 'need' else have[n]})" for n in wanted if n in have))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=".device_bundle-") as tmp:
        bundle, work = Path(tmp) / "bundle", Path(tmp) / "work"
        bundle.mkdir(), work.mkdir()
        for name in chosen:
            wheel = fetch_wheel(name, pins[name], args, work / name)
            if name == "ray":
                dropped = repack_wheel(wheel, bundle / wheel.name, ray_drop, strip_elf)
                log(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB -> "
                    f"{(bundle / wheel.name).stat().st_size / 2**20:.1f} MiB without {len(dropped)} entries")
            else:
                shutil.move(wheel, bundle / wheel.name)
                log(f"{wheel.name}")
        (bundle / "install.sh").write_text(INSTALL_SH)
        (bundle / "install.sh").chmod(0o755)
        (bundle / MARK).write_text("made by bench/device_bundle.py\n")

        sizes = sorted(((p.stat().st_size / 2**20, p.name) for p in bundle.iterdir()), reverse=True)
        total = sum(s for s, _ in sizes)
        width = max(len(name) for _, name in sizes)
        for size, name in sorted(sizes, key=lambda s: s[1]):
            log(f"  {name:<{width}} {size:7.2f} MiB")
        log(f"  {'total':<{width}} {total:7.2f} MiB (limit {args.max_mib:g})")
        if total > args.max_mib:
            largest = ", ".join(f"{n} {s:.1f} MiB" for s, n in sizes[:5])
            fail(f"{total:.1f} MiB is over --max-mib {args.max_mib:g}; nothing written to {args.out}. "
                 f"Largest: {largest}")
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(bundle, args.out)
    log(f"wrote {args.out}; on the device: sh {args.out}/install.sh [TARGET]")


if __name__ == "__main__":
    main()
