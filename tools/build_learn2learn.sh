#!/usr/bin/env bash
# Builds a learn2learn 0.2.0 wheel that installs on Python >= 3.11 (upstream issue learnables/learn2learn#413):
# the sdist's pre-generated C files include longintrepr.h, gone since 3.11, so we regenerate them with Cython 3.
# We also drop two declared dependencies metaray never uses: `gsutil` (only downloads Quickdraw; pulls a large
# tree of cloud packages) and `qpth` (only MetaOptNet; every qpth release pins numpy<2, which breaks pyarrow).
# learn2learn imports without them (it guards the qpth import).
set -euo pipefail
VENV=$(cd "$1" && pwd)
OUT=$2
PY="$VENV/bin/python"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
"$PY" -m pip download --no-deps --no-binary :all: learn2learn==0.2.0 -d "$WORK" >/dev/null
tar xzf "$WORK"/learn2learn-0.2.0.tar.gz -C "$WORK"
SRC="$WORK/learn2learn-0.2.0"
for f in meta_dataset task_dataset transforms; do
  "$VENV/bin/cython" -3 "$SRC/learn2learn/data/$f.pyx"
done
sed -i -e "/'gsutil',/d" -e "/'qpth>=0.0.15',/d" "$SRC/setup.py"
(cd "$SRC" && "$PY" -m pip wheel --no-build-isolation --no-deps . -w "$WORK/dist" >/dev/null)
cp "$WORK"/dist/learn2learn-*.whl "$OUT"/
echo "[install] built $(ls "$OUT"/learn2learn-*.whl)"
