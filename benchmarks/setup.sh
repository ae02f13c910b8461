#!/usr/bin/env bash
# Install what benchmarks/bench.py needs (Debian/Ubuntu). Idempotent: runs
# apt-get update + install only when a package is missing, pip only when
# gevent is not importable.
#
#   bash benchmarks/setup.sh
#
# PYTHON=/path/to/python selects the interpreter (default: python, else python3).
set -euo pipefail

pkgs=(socat haproxy iperf3 sockperf redis-server redis-tools nginx libnginx-mod-stream wrk)

missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update
    $sudo apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "setup: ${pkgs[*]} already installed"
fi

py="${PYTHON:-}"
if [ -z "$py" ]; then
    if command -v python >/dev/null 2>&1; then py=python; else py=python3; fi
fi
if ! "$py" -c 'import gevent' >/dev/null 2>&1; then
    echo "setup: pip installing gevent for $py"
    "$py" -m pip install 'gevent>=23.9'
else
    echo "setup: gevent $("$py" -c 'import gevent; print(gevent.__version__)') already installed"
fi

if ! "$py" -c 'import uvloop' >/dev/null 2>&1; then
    echo "setup: pip installing uvloop for $py (the asyncio peer, uvloop_forwarder.py)"
    "$py" -m pip install uvloop
fi

for t in socat haproxy iperf3 sockperf redis-server redis-benchmark nginx wrk; do
    command -v "$t" >/dev/null || { echo "setup: $t still missing" >&2; exit 1; }
done
echo "setup: done; run: $py benchmarks/bench.py"
