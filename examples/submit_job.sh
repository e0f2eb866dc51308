#!/usr/bin/env bash
# Ray Jobs walkthrough: start a head node (token auth is on by default in Ray >= 2.60), submit a metaray run,
# follow it, stop the head. Run from the repository root.
set -euo pipefail
export RAY_AUTH_MODE=token
ray start --head --dashboard-port 8265 --num-cpus 3
# `metaray submit` uploads the working dir, waits for the head's job agent, streams the job's log and prints where
# the run directory is (here an absolute path on the head node, not the job's temporary working dir):
metaray submit examples/sinusoid_maml.toml --address http://127.0.0.1:8265 --set run.steps=200 \
    --output-dir "$PWD/runs"
ray job list --address http://127.0.0.1:8265
ray stop
