"""Helpers for tests that start Ray clusters in other processes."""

from __future__ import annotations

from pathlib import Path

import psutil


def stop_cluster(temp_dir: Path) -> None:
    """Stop only the Ray processes of the cluster this test started (`ray stop` would stop every cluster here)."""
    victims = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
                victims += [p] + p.children(recursive=True)
        except psutil.Error:
            continue
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=20)
