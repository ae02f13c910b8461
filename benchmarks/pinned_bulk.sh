#!/bin/bash
# Bulk with a core of its own: is 0.9 of direct reachable when the forwarder does not compete
# with the endpoints? iperf3 client and server pinned to CPU 0, the forwarder to CPU 1.
#
#     bash benchmarks/pinned_bulk.sh [REPS] [CHECKOUT...]
#
# Prints, per repetition (interleaved), Gbit/s up and down for direct and for gproxy from this
# checkout (and from each other CHECKOUT given), and the forwarder's CPU ms per GB; then the
# medians and ratios to direct. Needs iperf3 and taskset, and at least two CPUs.
set -euo pipefail
REPS=${1:-3}
shift || true
HERE=$(cd "$(dirname "$0")/.." && pwd)
CHECKOUTS=("$HERE" "$@")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
taskset -c 0 iperf3 -s -p "$PORT" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
sleep 0.5
RESULTS=$(mktemp)

run() {  # name port args -> "name dir gbps ms_per_gb"
  local name=$1 port=$2 dir=$3 pid=${4:-}
  local a=0 b=0 out
  [ -n "$pid" ] && a=$(awk '{print $14+$15}' /proc/$pid/stat)
  out=$(taskset -c 0 iperf3 -c 127.0.0.1 -p "$port" -t 3 $dir -J | python3 -c '
import json, sys
e = json.load(sys.stdin)["end"]["sum_received"]
print(e["bits_per_second"] / 1e9, e["bytes"])')
  [ -n "$pid" ] && b=$(awk '{print $14+$15}' /proc/$pid/stat)
  python3 -c "
g, by = map(float, '$out'.split())
ms = ($b - $a) * 1000 / $(getconf CLK_TCK) / (by / 1e9) if '$pid' else 0
print('$name', '${dir:-up}', round(g, 2), round(ms))" | tee -a "$RESULTS"
}

for rep in $(seq "$REPS"); do
  for dir in "" "-R"; do
    run direct "$PORT" "$dir"
    for checkout in "${CHECKOUTS[@]}"; do
      name=gproxy; [ "$checkout" != "$HERE" ] && name="gproxy@$(git -C "$checkout" rev-parse --short HEAD)"
      log=$(mktemp)
      (cd "$checkout" && exec taskset -c 1 python3 -m gproxy 127.0.0.1:0 "127.0.0.1:$PORT" 2>"$log") &
      fw=$!
      for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
      lport=$(grep -o "listening on 127.0.0.1:[0-9]*" "$log" | grep -o "[0-9]*$")
      run "$name" "$lport" "$dir" "$fw"
      kill -TERM "$fw"; wait "$fw" 2>/dev/null || true
      rm -f "$log"
    done
  done
done

python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for direction in ("up", "-R"):
    base = statistics.median(float(r[2]) for r in rows if r[0] == "direct" and r[1] == direction)
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name and r[1] == direction]
        g = statistics.median(float(r[2]) for r in mine)
        ms = statistics.median(float(r[3]) for r in mine)
        print("%-18s %-4s median %6.2f Gbit/s  ratio %.2f  %s" % (
            name, "down" if direction == "-R" else "up", g, g / base,
            "" if name == "direct" else "CPU %d ms/GB" % ms))
EOF
rm -f "$RESULTS"
