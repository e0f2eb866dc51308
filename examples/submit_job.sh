#!/usr/bin/env bash
# Ray Jobs walkthrough: start a head node (token auth is on by default in Ray >= 2.60), submit a metaray run,
# follow it, stop the head. Run from the repository root.
set -euo pipefail
export RAY_AUTH_MODE=token
ray start --head --dashboard-port 8265 --num-cpus 3
# `metaray submit` forwards the working dir and runtime env to `ray job submit`:
metaray submit examples/sinusoid_maml.toml --address http://127.0.0.1:8265 --set run.steps=200
ray job list --address http://127.0.0.1:8265
ray stop
