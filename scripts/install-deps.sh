#!/usr/bin/env bash
# Installs the Debian packages the build and tests need, only those missing. Idempotent.
set -euo pipefail

say() { printf '[install-deps] %s\n' "$*" >&2; }

need=()
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v curl >/dev/null 2>&1 || need+=(curl)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
python3 -c 'import venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# make check-deploy: systemd-analyze, systemd-sysusers and systemd-tmpfiles check the units and
# snippets of deploy/systemd; orchestratord.service reloads with /bin/kill.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
[ -x /bin/kill ] || need+=(procps)
# The operator console's test (orchestratord tests/it/ui.rs) drives headless Chromium.
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  say "missing packages: ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}"
  exit 1
fi
say "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
