#!/usr/bin/env bash
# Installs Prometheus for the monitoring tests (tests/cluster/test_monitoring_prometheus.py); `make test` calls it,
# `make demo` does not. Idempotent: nothing happens when `prometheus` is already on PATH.
#
# Debian's package (bookworm: 2.42) would start a system service listening on 0.0.0.0:9090. We never want that:
# the tests run their own prometheus on 127.0.0.1 with a temporary storage dir. So service starts are refused for
# the duration of the install (Debian's policy-rc.d protocol: exit 101 = "action forbidden"), and the service is
# disabled afterwards where systemd runs. --no-install-recommends keeps prometheus-node-exporter (another
# 0.0.0.0 listener, on :9100) out.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
  echo "[install-monitoring] prometheus already installed: $(prometheus --version 2>&1 | head -n 1)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install-monitoring] no apt-get here: install Prometheus >= 2.40 yourself (https://prometheus.io/download/)" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "[install-monitoring] need root (or sudo) to apt-get install prometheus" >&2
    exit 1
  fi
fi

POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
cleanup() { if [ "$ADDED_POLICY" = 1 ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
  ADDED_POLICY=1
  printf '#!/bin/sh\n# added by metaray tools/install_monitoring.sh for one install\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
fi

echo "[install-monitoring] apt-get install prometheus (~96 MB)"
APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"  # env: sudo would drop an exported variable
$APT update -qq
$APT install -y -qq --no-install-recommends prometheus >/dev/null
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
echo "[install-monitoring] ok: $(prometheus --version 2>&1 | head -n 1)"
