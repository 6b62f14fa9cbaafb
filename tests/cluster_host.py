"""A real multi-node Ray cluster on this machine, driven over stdin/stdout by a test: one raylet per node, each with
its own object store and worker processes, all on 127.0.0.1 (ray.cluster_utils.Cluster).

    python -m tests.cluster_host TEMP_DIR DASHBOARD_PORT HEAD_RESOURCES_JSON

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
import sys  # noqa: E402
import time  # noqa: E402

from ray.cluster_utils import Cluster  # noqa: E402


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main(temp_dir: str, dashboard_port: int, head_resources: dict) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": head_resources, "temp_dir": temp_dir, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    })
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
                                               temp_dir=f"{temp_dir}-{name}-{len(nodes)}")
                cluster.wait_for_nodes()
                say(name=name, node_id=nodes[name].node_id)
            elif command == "kill":
                cluster.remove_node(nodes.pop(args[0]), allow_graceful=False)
                say(killed=args[0], at=time.time())
            elif command == "quit":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
