#!/usr/bin/env bash
# Create or update .venv with the tested versions (constraints.txt). Does nothing when already up to date.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.flowrl-installed
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the tested versions into .venv (about 2 minutes on a fresh machine)"
  # torch first and pinned: letting a dependency pick it pulls a multi-GB CUDA build.
  .venv/bin/pip install -q -c constraints.txt torch==2.13.0
  .venv/bin/pip install -q -c constraints.txt -e '.[test,wandb]'
  echo "$want" > "$stamp"
fi
# Sample photos for the GenEval detector tests (Debian's darknet package); skipped with a message without apt-get.
tests/fixtures/fetch_darknet_photos.sh
# Debian's Prometheus server for the metrics test, unpacked into .cache/prometheus.
tests/fixtures/fetch_prometheus.sh
