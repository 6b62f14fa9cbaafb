"""A real multi-node Ray cluster on this machine, for tests and benchmarks: one raylet per node, each with its own
object store, worker processes and temp folder, all on 127.0.0.1 (ray.cluster_utils.Cluster). `LocalCluster` starts
it in its own process and commands it line by line:

    python bench/local_cluster.py TEMP_DIR DASHBOARD_PORT HEAD_RESOURCES_JSON

It prints one JSON line when the head is up ({"address": ..., "dashboard": ...}) and one per command:
    add NAME CPUS RESOURCES_JSON   a worker node with those CPUs and custom resources -> {"name", "node_id"}
    kill NAME                      the node's processes killed at once, a node loss     -> {"killed", "at"}
    quit                           every node stopped
Ray notices a lost node within about 3 s here (health checks every second, three misses); real clusters keep Ray's
defaults.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main(temp_dir: str, dashboard_port: int, head_resources: dict) -> None:
    """The cluster's side: start the head, then follow the commands on stdin."""
    from ray.cluster_utils import Cluster

    # every node's agent on a port of its own: Ray's default (52365) may be taken by another Ray on this machine, and
    # a head without its agent takes no job submissions
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": head_resources, "temp_dir": temp_dir, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port, "dashboard_agent_listen_port": _free_port(),
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    })
    # where a submitted job's driver looks for its cluster ("auto"); `ray start` writes it, this in-process head not
    # (without it the driver would take any Ray it finds on this machine)
    from ray._private.utils import write_ray_address

    write_ray_address(cluster.address, temp_dir)
    nodes = {}
    try:
        say(address=cluster.address, dashboard=f"http://127.0.0.1:{dashboard_port}")
        for line in sys.stdin:
            command, *args = line.split(maxsplit=3)
            if command == "add":
                name, cpus, resources = args
                # each node its own temp folder, as on separate machines (a shared one would also share the copies of
                # a submitted job's working folder, which every node unpacks anew)
                nodes[name] = cluster.add_node(num_cpus=int(cpus), resources=json.loads(resources),
                                               temp_dir=f"{temp_dir}-{name}-{len(nodes)}",
                                               dashboard_agent_listen_port=_free_port())
                cluster.wait_for_nodes()
                say(name=name, node_id=nodes[name].node_id)
            elif command == "kill":
                cluster.remove_node(nodes.pop(args[0]), allow_graceful=False)
                say(killed=args[0], at=time.time())
            elif command == "quit":
                break
    finally:
        cluster.shutdown()


def stop_processes_of(temp_dir: Path, *also: re.Pattern) -> None:
    """Kill the Ray processes whose command line names `temp_dir` (a cluster started with it) or matches one of `also`,
    and their children: `ray stop` would stop every cluster on the machine."""
    victims = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and (str(temp_dir) in line or any(pattern.search(line) for pattern in also)):
                victims += [p] + p.children(recursive=True)
        except psutil.Error:
            continue
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=20)


def submit_job(ray_bin: str, dashboard: str, command: list[str], cwd: Path, env: dict[str, str],
               wait_s: float = 240.0) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- COMMAND` to the cluster whose dashboard is `dashboard`, waiting for it;
    submitted again while the head's job agent is still starting (Ray refuses the job then, and runs nothing)."""
    end = time.monotonic() + wait_s
    while True:
        r = subprocess.run([ray_bin, "job", "submit", f"--address={dashboard}", "--working-dir", ".", "--", *command],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in r.stdout + r.stderr or time.monotonic() > end:
            return r
        time.sleep(3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """The caller's side: the cluster in its own process (the head with 1 CPU and `head_resources`), nodes added and
    killed on demand; `close` stops every process of it (and only those) and removes its temp folders."""

    def __init__(self, temp_dir: Path, head_resources: dict[str, float], env: dict[str, str]) -> None:
        """`temp_dir`: short (Ray's socket paths are limited); `env`: the venv first on PATH, since a submitted job's
        `python` is the head node's."""
        self.temp_dir = temp_dir
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(temp_dir), str(_free_port()), json.dumps(head_resources)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        head = self._answer()
        self.address, self.dashboard = head["address"], head["dashboard"]
        self.nodes: dict[str, str] = {}  # name -> node id

    def _answer(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the cluster process ended (exit {self.proc.poll()})")
            if line.startswith("{"):
                return json.loads(line)

    def _command(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def add(self, name: str, cpus: int, resources: dict[str, float]) -> str:
        """A worker node; its id."""
        self.nodes[name] = self._command(f"add {name} {cpus} {json.dumps(resources)}")["node_id"]
        return self.nodes[name]

    def kill(self, name: str) -> float:
        """Kill the node's processes at once (a node loss); when it happened."""
        self.nodes.pop(name, None)
        return self._command(f"kill {name}")["at"]

    def close(self) -> None:
        try:
            self._command("quit")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        stop_processes_of(self.temp_dir)  # whatever is left; the nodes' folders are TEMP_DIR-name-n
        for folder in self.temp_dir.parent.glob(f"{self.temp_dir.name}*"):
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
