"""Resize the rollout pool of a running job, or show where its actors are, from outside the job.

    python -m cluster.scale --run RUN_NAME [--address ADDR] [--namespace flowrl] --rollout N
    python -m cluster.scale --run RUN_NAME [--address ADDR] [--namespace flowrl] --show

It reaches the job through its control actor (cluster/control.py), named after the job's `run_name` in the job's Ray
namespace. The driver carries a resize out between two groups (or after an update): new actors load the current
weights before their first group, removed ones finish the group they hold; the answer is printed here and in the
job's log. A size the cluster cannot place is refused and the pool stays as it was (exit 2).
"""

from __future__ import annotations

import os

# Before anything imports ray: a Ray started on loopback is reached on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from cluster.control import control_name  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cluster.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="the job's run_name")
    ap.add_argument("--address", help="the Ray cluster's address (default: RAY_ADDRESS, else the local one)")
    ap.add_argument("--namespace", default="flowrl", help="the job's ray.namespace (default: flowrl)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--rollout", type=int, metavar="N", help="the number of rollout actors the job should have")
    what.add_argument("--show", action="store_true", help="print each pool's actors, nodes and policy versions")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the job's answer")
    return ap.parse_args(argv)


def show(snapshot: dict) -> str:
    """The job's pools as a table: pool, actor, node, policy version."""
    lines = [f"iteration {snapshot.get('iteration', '?')}, policy version {snapshot.get('policy_version', '?')}",
             "| pool | actor | node | policy version |", "|---|---|---|---|"]
    for pool, actors in snapshot.get("pools", {}).items():
        for actor in actors:
            version = actor.get("policy_version")
            lines.append(f"| {pool} | {actor['name']} | {actor['node']} | {'–' if version is None else version} |")
    return "\n".join(lines)


def unreachable(address: str) -> str | None:
    """Why nothing answers at a `host:port` address, or None (Ray itself would retry a dead address for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None  # "auto", "ray://...": left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rollout is not None and args.rollout < 1:
        print(f"error: --rollout {args.rollout}: a rollout pool needs at least 1 actor", file=sys.stderr)
        return 2
    import ray

    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    if (why := unreachable(address)) is not None:
        print(f"error: nothing answers at {address!r} ({why}): is the job's cluster up? give --address",
              file=sys.stderr)
        return 2
    try:
        ray.init(address=address, namespace=args.namespace, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as err:
        print(f"error: cannot reach a Ray cluster at {address!r} ({err}); give --address", file=sys.stderr)
        return 2
    try:
        control = ray.get_actor(control_name(args.run))
    except ValueError:
        print(f"error: no running job named {args.run!r} in namespace {args.namespace!r} of the cluster at "
              f"{address!r}; check --run (the job's run_name) and --namespace (its ray.namespace)", file=sys.stderr)
        return 2
    if args.show:
        print(show(ray.get(control.snapshot.remote())))
        return 0
    request = ray.get(control.request.remote("rollout", args.rollout))
    deadline = time.monotonic() + args.timeout
    while (answer := ray.get(control.answer_of.remote(request))) is None:
        if time.monotonic() > deadline:
            print(f"error: the job did not answer within {args.timeout:g} s; the request stays queued",
                  file=sys.stderr)
            return 1
        time.sleep(0.5)
    done, message = answer
    print(message if done else f"error: {message}", file=sys.stdout if done else sys.stderr)
    return 0 if done else 2


if __name__ == "__main__":
    sys.exit(main())
