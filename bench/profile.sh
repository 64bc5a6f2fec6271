#!/usr/bin/env bash
# Where does the HomeNet node spend its time? Profiles of the node under load.
#
#   bench/profile.sh [OUTDIR]            profile the throughput and the seq-connection runs
#
# Profile mode: starts the home services (bench/peers.sh) and one node (:16969), then for each
# workload -- `tput` (hnperf, 1 stream, preamble client, T s) and `seq` (bench_conn.py seq
# --homenet, N connections) -- runs it once bare, then once under each profiler attached to
# the node process:
#   pyspy   py-spy record --nonblocking (Python stacks; C time shows on the calling frame)
#           -> WORKLOAD.pyspy.raw + WORKLOAD.pyspy.txt (top self / inclusive functions)
#   perf    perf record -g (native + kernel symbols) -> WORKLOAD.perf.txt (by DSO, by symbol)
#   strace  strace -c -f (syscall counts; slows the node a lot: use it for counts per
#           connection, not for times) -> WORKLOAD.strace.txt
# Environment: T=10 N=3000 PROFILERS="pyspy perf strace" WORKLOADS="tput seq"
# py-spy: .venv/bin/pip install py-spy ; perf: apt-get install linux-perf
# shellcheck source-path=SCRIPTDIR disable=SC2034
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HN=${HOMENET:-$ROOT/.venv/bin/homenet}  # used by lib.sh
PY=${PYTHON:-$ROOT/.venv/bin/python}
PYSPY=${PYSPY:-$ROOT/.venv/bin/py-spy}
export BP=${BP:-/tmp/hnb}
RUN=$BP/run LOG=$BP/log
OUT=${1:-$BP/profile/profile-$(date +%Y%m%d-%H%M%S)}
T=${T:-10} N=${N:-3000} C=${C:-50}
PROFILERS=${PROFILERS:-"pyspy perf strace"}
H=127.0.0.1 NODE_PORT=16969 RATE=200
mkdir -p "$OUT" "$RUN" "$LOG"
ulimit -n 20000 2>/dev/null || true
# shellcheck source=lib.sh
. "$HERE/lib.sh"
check_ports 7001 5201 5301 27001 25201 25301 $NODE_PORT

log "starting home services (BP=$BP) -> $OUT"
"$HERE/peers.sh" start haproxy >"$LOG/peers.start" 2>&1 || { cat "$LOG/peers.start" >&2; exit 1; }

workload() {  # workload NAME LABEL : one run against the node on :16969, JSON on stdout
    case $1 in
    tput) "$BP/bin/hnperf" client $H:$NODE_PORT --homenet $H:5301 -P 1 -t "$T" --label "$2" ;;
    tput8) "$BP/bin/hnperf" client $H:$NODE_PORT --homenet $H:5301 -P 8 -t "$T" --label "$2" ;;
    seq) "$PY" "$HERE/bench_conn.py" seq $H:$NODE_PORT --homenet=$H:7001 -n "$N" --label "$2" ;;
    conc) "$PY" "$HERE/bench_conn.py" conc $H:$NODE_PORT --homenet=$H:7001 -n "$N" -c "$C" --label "$2" ;;
    esac
}
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
bare() {  # bare WORKLOAD LABEL : run once, add the node's CPU % to the JSON line
    local np c0 t0 line
    np=$(pid node); c0=$(cpu_ticks "$np"); t0=$(date +%s.%N)
    line=$(workload "$1" "$2")
    awk -v c0="$c0" -v c1="$(cpu_ticks "$np")" -v t0="$t0" -v t1="$(date +%s.%N)" -v hz="$(getconf CLK_TCK)" \
        -v l="$line" 'BEGIN { sub(/}$/, "", l); printf "%s, \"node_cpu_pct\": %.0f}\n", l, 100 * (c1 - c0) / hz / (t1 - t0) }'
}

start_node node $NODE_PORT
NP=$(pid node)
log "node pid $NP"
sleep 1
for w in ${WORKLOADS:-tput seq}; do
    bare $w "$w#bare" | tee "$OUT/$w.bare.json" | cut -c1-200 >&2
    sleep 1
    for prof in $PROFILERS; do
        case $prof in
        pyspy) "$PYSPY" record --nonblocking -r $RATE -p "$NP" --format raw -o "$OUT/$w.pyspy.raw" \
                   >"$LOG/pyspy.out" 2>&1 & ;;
        perf) perf record -F 499 -g -p "$NP" -o "$OUT/$w.perf.data" >"$LOG/perf.out" 2>&1 & ;;
        strace) strace -c -f -p "$NP" -o "$OUT/$w.strace.txt" >"$LOG/strace.out" 2>&1 & ;;
        *) echo "unknown profiler $prof" >&2; continue ;;
        esac
        ppid=$!
        sleep 1
        t0=$(date +%s.%N)
        workload $w "$w#$prof" | tee "$OUT/$w.$prof.json" | cut -c1-200 >&2
        t1=$(date +%s.%N)
        kill -INT "$ppid" 2>/dev/null
        wait "$ppid" 2>/dev/null
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a + 0.5 }')  # + settle time
        case $prof in
        pyspy) "$PY" "$HERE/stacks.py" "$OUT/$w.pyspy.raw" --seconds "$secs" --rate $RATE >"$OUT/$w.pyspy.txt" ;;
        perf) {
                echo "== by DSO (self)"
                perf report -i "$OUT/$w.perf.data" --no-children --sort dso --stdio -g none 2>/dev/null \
                    | grep -v -e '^#' -e '^$' | head -15
                echo "== by symbol (self)"
                perf report -i "$OUT/$w.perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null \
                    | grep -v -e '^#' -e '^$' | head -60
              } >"$OUT/$w.perf.txt" ;;
        esac
        sleep 1
    done
done
stop_hn node
for f in "$OUT"/*.txt; do echo "===== $(basename "$f")"; head -45 "$f"; done
echo "profiles: $OUT" >&2
