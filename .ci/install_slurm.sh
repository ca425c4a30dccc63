#!/usr/bin/env bash
# .ci/install_slurm.sh — install SLURM + munge from Debian packages (if missing) and start the
# single-node test cluster (launchers/slurm_local.sh start). Idempotent: safe to run again.
#
#   .ci/install_slurm.sh
#   export SLURM_CONF=/tmp/sae_sweep_slurm/slurm.conf   # or: eval "$(launchers/slurm_local.sh env)"
#
# Runs apt-get as root, or through sudo when not root. SAE_SWEEP_SLURM_* variables are passed
# through to slurm_local.sh (state dir, timeout, ...).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACKAGES=(slurm-wlm munge)

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "[install_slurm] need root or sudo" >&2; exit 1; }
    SUDO=(sudo -E)
fi

installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

if ((${#missing[@]})); then
    echo "[install_slurm] installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q "${missing[@]}"
else
    echo "[install_slurm] already installed: ${PACKAGES[*]}" >&2
fi

"${SUDO[@]}" "$ROOT/launchers/slurm_local.sh" start
