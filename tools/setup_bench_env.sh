#!/usr/bin/env bash
# Creates .venv-bench: the peer libraries metaray is benchmarked against, in their own environment.
#
# Why a separate venv: boat-torch 1.1.1 pins numpy<=1.26.4, which breaks pyarrow 26 (and so Ray's object
# store) in metaray's .venv (see shared NOTES.md). The peers get the same torch build as metaray
# (PyPI's default torch 2.13.0, never the local +cpu wheel) so the timings compare like with like.
# Peers: higher 0.2.1, torchopt 0.7.3, boat-torch 1.1.1 (the newest on PyPI when this was written) and
# learn2learn 0.2.0 (the wheel rebuilt for Python >= 3.11 by tools/build_learn2learn.sh, reused from build/wheels).
# Idempotent: does nothing once .venv-bench/.installed exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-bench
TORCH_SPEC="torch==2.13.0,!=2.13.0+cpu"
WHEELS=build/wheels
if [ -f "$VENV/.installed" ]; then
  echo "[bench-env] $VENV already set up"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --upgrade "pip>=24" setuptools wheel >/dev/null
if ! ls $WHEELS/learn2learn-0.2.0-*.whl >/dev/null 2>&1; then
  [ -x .venv/bin/python ] || { echo "[bench-env] needs .venv (run make install first) to build learn2learn" >&2; exit 1; }
  bash tools/build_learn2learn.sh .venv "$WHEELS"
fi
echo "[bench-env] torch + peers"
$PIP install --find-links "$WHEELS" "$TORCH_SPEC" "higher==0.2.1" "torchopt==0.7.3" "boat-torch==1.1.1" "learn2learn==0.2.0"
$VENV/bin/python - <<'PY'
import torch, higher, torchopt, boat_torch, learn2learn, numpy
print("[bench-env] ok: torch", torch.__version__, "numpy", numpy.__version__, "torchopt", torchopt.__version__,
      "learn2learn", learn2learn.__version__)
PY
touch "$VENV/.installed"
