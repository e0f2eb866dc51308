#!/usr/bin/env bash
# Creates .venv and installs everything metaray needs, on a fresh machine, with no manual step.
#
# Two traps on this machine type (see shared NOTES.md) are handled explicitly:
#  * pip's config offers a local CPU-only torch wheel (torch==2.13.0+cpu), but no CPU build of torchvision
#    exists and PyPI's torchvision links CUDA's c10. So we pin PyPI's default torch build and exclude +cpu.
#  * learn2learn 0.2.0's sdist ships C sources from an old Cython that do not compile on Python >= 3.11.
#    We regenerate them with a current Cython and build a wheel (tools/build_learn2learn.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC="torch==2.13.0,!=2.13.0+cpu"
TV_SPEC="torchvision==0.28.0"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --upgrade "pip>=24" setuptools wheel "cython>=3" >/dev/null
echo "[install] torch + torchvision (PyPI build; see NOTES.md)"
$PIP install "$TORCH_SPEC" "$TV_SPEC"
echo "[install] learn2learn (rebuilt from sdist)"
WHEELS=build/wheels
if ! ls $WHEELS/learn2learn-0.2.0-*.whl >/dev/null 2>&1; then
  bash tools/build_learn2learn.sh "$VENV" "$WHEELS"
fi
echo "[install] metaray and the rest"
$PIP install --find-links "$WHEELS" "$TORCH_SPEC" "$TV_SPEC" -e ".[test]"
$VENV/bin/python -c "import torch, torchvision, learn2learn, ray, pyarrow; print('[install] ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'learn2learn', learn2learn.__version__, 'ray', ray.__version__)"
touch "$VENV/.installed"
