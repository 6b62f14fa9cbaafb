"""The one way tests launch a job: `python -m learner.main --cfg cluster/<cfg>.yaml --set k=v ...` in a process of its
own, in the foreground (`run_job`) or in the background (`start_job`); `job_args` for a job submitted to a cluster;
`listening`: the sockets a running job listens on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MAIN = ["-m", "learner.main"]


def job_env(**changes: str | None) -> dict[str, str]:
    """This process' environment without RAY_ADDRESS (a job starts a local Ray of its own unless told), the venv's bin
    first on PATH (for `ray`), then `changes` (None: removed)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# What a test job gets unless it sets the key itself: a free metrics port (jobs of two test processes run side by side)
# and, for cluster/tiny.yaml, one rollout worker (a second only adds start-up to a job of a few iterations on 2 cores).
TEST_DEFAULTS = ("metrics.port=0",)
TINY_DEFAULTS = ("rollout.num_actors=1",)


def job_args(cfg: str, *overrides: str, out: Path | None = None, resume: str | None = None,
             dry_run: bool = False) -> list[str]:
    """learner.main's arguments: cluster/<cfg>.yaml (or the path `cfg`), the defaults above that no override sets,
    output_dir=`out`, then each override."""
    path = cfg if cfg.endswith(".yaml") else f"cluster/{cfg}.yaml"
    args = ["--cfg", path]
    given = {o.split("=", 1)[0] for o in overrides}
    defaults = [d for d in TEST_DEFAULTS + (TINY_DEFAULTS if cfg == "tiny" else ()) if d.split("=", 1)[0] not in given]
    for o in defaults + ([f"output_dir={out}"] if out is not None else []) + list(overrides):
        args += ["--set", o]
    return args + (["--resume", resume] if resume else []) + (["--dry-run"] if dry_run else [])


def history(out: Path) -> list[dict]:
    """The lines of out/history.jsonl written so far."""
    path = out / "history.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []


@dataclass(frozen=True)
class JobRun:
    """A finished job: its exit status, what it printed, its output folder."""

    rc: int
    stdout: str
    stderr: str
    out: Path | None

    @property
    def history(self) -> list[dict]:
        return history(self.out)

    @property
    def errors(self) -> list[str]:
        """The stderr lines that start with "error:"."""
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]


def run_job(cfg: str, *overrides: str, out: Path | None, expect_rc: int = 0, timeout: float = 600,
            resume: str | None = None, dry_run: bool = False, env: dict[str, str] | None = None,
            script: str | None = None) -> JobRun:
    """Run the job to its end and check its exit status. `script`: Python code run with learner.main's arguments
    instead of the module (to change the job from inside)."""
    head = ["-c", script] if script else MAIN
    r = subprocess.run([sys.executable, *head, *job_args(cfg, *overrides, out=out, resume=resume, dry_run=dry_run)],
                       cwd=ROOT, env=env or job_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == expect_rc, f"exit {r.returncode}, not {expect_rc}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return JobRun(r.returncode, r.stdout, r.stderr, out)


@contextmanager
def start_job(cfg: str, *overrides: str, out: Path, log: Path | None = None, resume: str | None = None,
              env: dict[str, str] | None = None, script: str | None = None) -> Iterator[subprocess.Popen]:
    """The job in the background, its output in `log` (or in the process' `stdout` pipe); on the way out, if it still
    runs, stopped with Ctrl-C (it shuts down its actors and its Ray), then killed. `script`: as for `run_job`."""
    sink = open(log, "w") if log else subprocess.PIPE
    head = ["-c", script] if script else MAIN
    proc = subprocess.Popen([sys.executable, *head, *job_args(cfg, *overrides, out=out, resume=resume)], cwd=ROOT,
                            env=env or job_env(), stdout=sink, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log:
            sink.close()


def listening(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket and bound UDP socket of a process tree."""
    found = []
    root = psutil.Process(root_pid)
    for proc in [root] + root.children(recursive=True):
        try:
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == 2 and c.laddr and not c.raddr):
                    found.append((c.laddr.ip, c.laddr.port, proc.name()))
        except psutil.Error:
            continue
    return found
