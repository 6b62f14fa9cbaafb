"""bench/device_bundle.py without the network: repacking a hand-made wheel with the drop rule used for Ray (RECORD,
bytes, permission bits, pip installs it), the Requires-Dist closure on a fake metadata mapping, argument errors."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import stat
import subprocess
import sys
import zipfile

import pytest

from bench_helpers import load_bench

device_bundle = load_bench("device_bundle")

DIST = "pkg-1.0.dist-info"
RECORD = f"{DIST}/RECORD"
EXECUTABLE = "pkg/bin/tool"
FILES = {
    "pkg/__init__.py": b"ANSWER = 42\n",
    "pkg/jars/big.jar": b"PK" + bytes(range(256)) * 64,
    "pkg/static/app.js": b"console.log(1);\n",
    "pkg/static/app.js.map": b'{"version": 3, "mappings": ""}\n',
    EXECUTABLE: b"#!/bin/sh\necho tool\n",
    f"{DIST}/METADATA": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n",
    f"{DIST}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
DROPPED = ["pkg/jars/big.jar", "pkg/static/app.js.map"]


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


@pytest.fixture
def wheels(tmp_path):
    """(source wheel, repacked wheel, dropped names); the source is stored uncompressed, with fixed dates and modes."""
    src, dst = tmp_path / "src" / "pkg-1.0-py3-none-any.whl", tmp_path / "pkg-1.0-py3-none-any.whl"
    src.parent.mkdir()
    record = "".join(record_line(n, d) for n, d in FILES.items()) + f"{RECORD},,\n"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as zf:
        for name, data in [*FILES.items(), (RECORD, record.encode())]:
            info = zipfile.ZipInfo(name, date_time=(2024, 5, 6, 7, 8, 10))
            info.external_attr = ((0o755 if name == EXECUTABLE else 0o644) | stat.S_IFREG) << 16
            zf.writestr(info, data)
    # The rule used for Ray, for this wheel's top-level package.
    dropped = device_bundle.repack_wheel(src, dst, device_bundle.jars_and_maps("pkg"))
    return src, dst, dropped


def test_ray_drop_rule():
    drop = device_bundle.ray_drop
    assert drop("ray/jars/ray_dist.jar") and drop("ray/dashboard/client/build/static/js/main.3f.js.map")
    assert not drop("ray/core/src/ray/raylet/raylet") and not drop("ray/dashboard/client/build/static/js/main.3f.js")
    assert not drop("ray-2.60.0.dist-info/RECORD") and not drop("pkg/jars/big.jar")
    assert drop("ray/rllib/algorithms/ppo/ppo.py") and drop("ray/serve/api.py") and drop("ray/data/dataset.py")
    assert not drop("ray/util/placement_group.py") and not drop("ray/dashboard/agent.py")
    assert not drop("ray/_private/ray_option_utils.py") and not drop("ray/util/data_helpers.py")


def test_rewritten_entries_get_new_record_lines(wheels, tmp_path):
    src, _, _ = wheels
    dst = tmp_path / "rewritten.whl"
    device_bundle.repack_wheel(src, dst, device_bundle.jars_and_maps("pkg"),
                               lambda name, data: data.upper() if name == "pkg/static/app.js" else data)
    with zipfile.ZipFile(dst) as zout:
        assert zout.read("pkg/static/app.js") == b"CONSOLE.LOG(1);\n"
        lines = zout.read(RECORD).decode().splitlines(keepends=True)
        assert record_line("pkg/static/app.js", b"CONSOLE.LOG(1);\n") in lines
        assert record_line("pkg/__init__.py", FILES["pkg/__init__.py"]) in lines
        assert len(lines) == len(FILES) - len(DROPPED) + 1


def test_strip_keeps_an_elf_binary_working_and_leaves_other_files(tmp_path):
    assert device_bundle.strip_elf("a.py", b"print(1)\n") == b"print(1)\n"
    binary = open("/bin/true", "rb").read()
    stripped = device_bundle.strip_elf("true", binary)
    assert stripped.startswith(b"\x7fELF") and len(stripped) <= len(binary)
    (tmp_path / "true").write_bytes(stripped)
    (tmp_path / "true").chmod(0o755)
    assert subprocess.run([str(tmp_path / "true")]).returncode == 0


def test_repack_drops_the_entries_and_their_record_lines(wheels):
    src, dst, dropped = wheels
    assert sorted(dropped) == DROPPED
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst) as zout:
        assert zout.testzip() is None
        names = zout.namelist()
        assert names == [n for n in zin.namelist() if n not in DROPPED]
        record = zout.read(RECORD).decode()
        rows = list(csv.reader(io.StringIO(record)))
        assert [r[0] for r in rows] == names  # exactly the remaining files, RECORD itself included
        for path, hash_, size in rows:
            if path == RECORD:
                assert (hash_, size) == ("", "")
            else:
                assert zout.read(path) == FILES[path]
                assert f"{path},{hash_},{size}\n" == record_line(path, FILES[path])
        kept = [line for line in zin.read(RECORD).decode().splitlines(keepends=True)
                if line.split(",")[0] not in DROPPED]
        assert record.splitlines(keepends=True) == kept  # the kept lines unchanged
        for name in names:
            before, after = zin.getinfo(name), zout.getinfo(name)
            assert (after.date_time, after.external_attr) == (before.date_time, before.external_attr), name
            assert after.compress_type == zipfile.ZIP_DEFLATED
        assert zout.getinfo(EXECUTABLE).external_attr >> 16 & 0o777 == 0o755


def test_repacked_wheel_installs_and_imports(wheels, tmp_path):
    _, dst, _ = wheels
    site = tmp_path / "site"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(dst)], check=True, env=env)
    out = subprocess.run([sys.executable, "-c", "import pkg; print(pkg.ANSWER, pkg.__file__)"], check=True,
                         capture_output=True, text=True, cwd=tmp_path, env=dict(env, PYTHONPATH=str(site)))
    answer, where = out.stdout.split()
    assert answer == "42" and where == str(site / "pkg" / "__init__.py")
    assert os.access(site / EXECUTABLE, os.X_OK)
    assert not (site / "pkg" / "jars").exists() and not (site / "pkg" / "static" / "app.js.map").exists()


def test_closure_follows_markers_for_the_target_and_skips_extras():
    requires = {  # a KeyError means the closure followed a requirement it should have skipped
        "a": ["B>=1", "c; python_version < '3.12'", "D[fast]; python_version >= '3.12'", "e; extra == 'test'",
              "f; sys_platform == 'win32'", "Shared_Name; platform_machine == 'x86_64'"],
        "b": ["shared.name"],
        "d": [],
        "g": ["b (>=2)"],
        "shared-name": ["b"],  # a cycle
    }
    env = device_bundle.target_env("3.12")
    got = device_bundle.closure(["A", "g"], requires.__getitem__, env)
    assert got == {"a": "need", "b": "via a, g", "d": "via a", "g": "need", "shared-name": "via a, g"}
    # The same mapping for 3.11 takes c instead of d.
    requires["c"] = []
    got = device_bundle.closure(["a"], requires.__getitem__, device_bundle.target_env("3.11"))
    assert got == {"a": "need", "b": "via a", "c": "via a", "shared-name": "via a"}


@pytest.mark.parametrize("argv, message", [
    (["--python-version", "3.x"], "expected X.Y"),
    (["--python-version", "312"], "expected X.Y"),
    (["--max-mib", "0"], "must be positive"),
    (["--out-is-not-ours"], "not made by this script"),
    (["--out-is-a-file"], "not a folder"),
])
def test_bad_arguments_exit_2_before_any_download(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    if argv == ["--out-is-not-ours"]:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        argv = []
    elif argv == ["--out-is-a-file"]:
        out.write_text("a file")
        argv = []
    with pytest.raises(SystemExit) as exit_:
        device_bundle.main(["--out", str(out), *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_an_out_folder_made_by_the_script_may_be_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / device_bundle.MARK).write_text("made by bench/device_bundle.py\n")
    (out / "old.whl").write_bytes(b"")
    assert device_bundle.parse_args(["--out", str(out)]).out == out
