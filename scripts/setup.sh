#!/usr/bin/env bash
# Create .venv and install CoGaLoRA Serve into it.
#   bash scripts/setup.sh          runtime only (serve, train, evaluate)
#   bash scripts/setup.sh --dev    + test tools, and the Debian packages the integration tests run
#                                  (prometheus, docker-compose; docker.io and debootstrap for the
#                                  image test, which builds its base images locally; chromium and
#                                  chromium-driver for the console's browser test)
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

if [ "$dev" = 1 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
  if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# torch first, pinned, so that no later dependency resolves another version. pip takes the build
# its configuration offers: a CPU wheel from a local wheelhouse or index where one is configured
# (--find-links, --extra-index-url, as on CI), else PyPI's default build.
$py -m pip install -q "torch==2.13.0"
if [ "$dev" = 1 ]; then
  $py -m pip install -q -e ".[dev]"
else
  $py -m pip install -q -e .
fi
# "int8 steps native": cogalora/int8_rows.c was compiled; "torch": no C compiler was found, and int8's
# per-token steps run as torch operations (same results, slower).
echo "setup: done ($($py -c 'import torch, transformers
from cogalora.int8_kernels import kernels
print("torch", torch.__version__, "transformers", transformers.__version__, "int8 steps", kernels())'))"
