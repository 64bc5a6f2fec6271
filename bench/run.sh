#!/usr/bin/env bash
# HomeNet performance benchmark, side by side with haproxy and a direct connection.
#
#   bench/run.sh [OUTDIR]          (default OUTDIR: /tmp/hnb/results/DATE-TIME)
#
# Starts the home services (C echo :7001, iperf3 :5201, hnperf sink :5301) and haproxy
# with bench/peers.sh, a HomeNet node (:16969) and `homenet listen` ports (:18001 -> echo,
# :18201 -> iperf3) on 127.0.0.1, then runs every phase with repetitions interleaved across
# systems, prints the summary (also saved as OUTDIR/summary.txt) and stops everything it
# started, by recorded PID.
#
# Environment (all optional):
#   REPS=3 T=10 N=2000 C=50 HOLD_N=1000
#   PHASES="tput conn hold"   TPUT_MODES="P1 P8"   (R<k> = k streams home -> public)
#   SYSTEMS="direct haproxy homenet homenet-listen"
#   BP=/tmp/hnb  (runtime files: configs, logs, PID files)
# Systems:
#   direct          the home service itself (no relay)
#   haproxy         haproxy 2.6, mode tcp, one hop
#   homenet         one HomeNet hop; the client speaks the preamble (bench_conn.py --homenet,
#                   hnperf --homenet), request + first payload in one write
#   homenet-listen  plain TCP client -> `homenet listen` -> node -> target (two processes, the
#                   way ssh/iperf3/browsers use HomeNet)
# Throughput: iperf3 for direct/haproxy/homenet-listen; hnperf (bench/hnperf.c, the same tool
# for every row) for direct/haproxy/homenet. Memory: a fresh node (and listen) per hold run.
# shellcheck source-path=SCRIPTDIR
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HN=${HOMENET:-$ROOT/.venv/bin/homenet}
PY=${PYTHON:-$ROOT/.venv/bin/python}
export BP=${BP:-/tmp/hnb}
RUN=$BP/run LOG=$BP/log
OUT=${1:-$BP/results/$(date +%Y%m%d-%H%M%S)}
REPS=${REPS:-3} T=${T:-10} N=${N:-2000} C=${C:-50} HOLD_N=${HOLD_N:-1000}
PHASES=${PHASES:-"tput conn hold"}
TPUT_MODES=${TPUT_MODES:-"P1 P8"}
read -r -a SYSTEMS <<<"${SYSTEMS:-direct haproxy homenet homenet-listen}"
H=127.0.0.1
NODE_PORT=16969 HOLD_NODE_PORT=16970
L_ECHO=18001 L_IPERF=18201 HOLD_L_ECHO=18002
PORTS=(7001 5201 5301 27001 25201 25301 "$NODE_PORT" "$HOLD_NODE_PORT" "$L_ECHO" "$L_IPERF" "$HOLD_L_ECHO")

mkdir -p "$OUT" "$RUN" "$LOG"
ulimit -n 20000 2>/dev/null || true
# shellcheck source=lib.sh
. "$HERE/lib.sh"
check_ports "${PORTS[@]}"

# -- CPU seconds used by relay processes during one measurement --------------------------------
cpu_s() {  # cpu_s PID... : utime+stime of the processes and their children (workers), in seconds
    local total=0 p f r kids=()
    for r in "$@"; do mapfile -t -O "${#kids[@]}" kids < <(pgrep -P "$r"); done
    for p in "$@" "${kids[@]}"; do
        [ -r "/proc/$p/stat" ] || continue
        f=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
        # fields after "comm": state=1 ... utime=12 stime=13
        total=$(( total + $(echo "$f" | awk '{print $12 + $13}') ))
    done
    awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}
relay_pids() {  # relay_pids SYSTEM
    case $1 in
    haproxy) pid haproxy ;;
    homenet) pid node ;;
    homenet-listen) echo "$(pid node) $(pid listen_echo) $(pid listen_iperf)" ;;
    esac
}
ensure_up() {  # restart the long-lived HomeNet processes if one has died (and record it)
    local name restarted=0
    for name in node listen_echo listen_iperf; do
        died $name "$OUT/events.txt" && restarted=1
    done
    [ $restarted = 1 ] || return 0
    for name in listen_echo listen_iperf; do stop_hn $name; done
    stop_hn node
    start_node node $NODE_PORT
    start_listen listen_echo $NODE_PORT 7001 $L_ECHO
    start_listen listen_iperf $NODE_PORT 5201 $L_IPERF
    echo "restarted node and listen processes at $(date +%T)" | tee -a "$OUT/events.txt" >&2
}
measure() {  # measure FILE LABEL SYSTEM CMD... : run CMD, append its JSON, record relay CPU
    local file=$1 label=$2 sys=$3; shift 3
    local pids c0 c1 t0 t1
    case $sys in homenet*) ensure_up ;; esac
    read -r -a pids <<<"$(relay_pids "$sys")"
    c0=$(cpu_s "${pids[@]}"); t0=$(date +%s.%N)
    "$@" | tee -a "$OUT/$file" | cut -c1-220 >&2
    c1=$(cpu_s "${pids[@]}"); t1=$(date +%s.%N)
    printf '{"label": "%s", "relay_cpu_s": %s, "wall_s": %s}\n' "$label" \
        "$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')" >>"$OUT/cpu.jsonl"
}

# -- start -----------------------------------------------------------------------------------
log "starting home services and haproxy (BP=$BP)"
"$HERE/peers.sh" start haproxy >"$LOG/peers.start" 2>&1 || { cat "$LOG/peers.start" >&2; exit 1; }
grep -q '^haproxy' "$RUN/targets.tsv" || { cat "$LOG/peers.start" >&2; exit 1; }
start_node node $NODE_PORT
start_listen listen_echo $NODE_PORT 7001 $L_ECHO
start_listen listen_iperf $NODE_PORT 5201 $L_IPERF
log "node pid $(pid node), listen pids $(pid listen_echo) $(pid listen_iperf) -> $OUT"
{
    echo "date: $(date -Is)"; echo "host: $(uname -srm), $(nproc) cpus"
    echo "homenet: $("$HN" --version 2>&1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet -- homenet 2>/dev/null || echo '+dirty'))"
    echo "haproxy: $(haproxy -v | head -1)"; echo "iperf3: $(iperf3 --version | head -1)"
    echo "python: $("$PY" -V 2>&1)"; echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "REPS=$REPS T=$T N=$N C=$C HOLD_N=$HOLD_N PHASES=$PHASES TPUT_MODES=$TPUT_MODES SYSTEMS=${SYSTEMS[*]}"
} >"$OUT/env.txt"

iperf_addr() { case $1 in direct) echo $H:5201;; haproxy) echo $H:25201;; homenet-listen) echo $H:$L_IPERF;; esac; }
sink_args() { case $1 in direct) echo $H:5301;; haproxy) echo $H:25301;;
                         homenet) echo "$H:$NODE_PORT --homenet $H:5301";; esac; }
echo_args() { case $1 in direct) echo $H:7001;; haproxy) echo $H:27001;;
                         homenet) echo "$H:$NODE_PORT --homenet=$H:7001";; homenet-listen) echo $H:$L_ECHO;; esac; }

for phase in $PHASES; do
  for rep in $(seq 1 "$REPS"); do
    case $phase in
    tput)
      for m in $TPUT_MODES; do
        k=${m:1}; r_iperf=(); r_hn=(); [ "${m:0:1}" = R ] && r_iperf=(--reverse) r_hn=(-R)
        for s in "${SYSTEMS[@]}"; do
          a=$(iperf_addr "$s")
          if [ -n "$a" ]; then
            measure tput_iperf3.jsonl "$s#$rep#$m#iperf3" "$s" \
              "$PY" "$HERE/bench_tput.py" "$a" -P "$k" -t "$T" "${r_iperf[@]}" --label "$s#$rep#$m#iperf3"
            sleep 1
          fi
          a=$(sink_args "$s")
          if [ -n "$a" ]; then
            # shellcheck disable=SC2086
            measure tput_hnperf.jsonl "$s#$rep#$m#hnperf" "$s" \
              "$BP/bin/hnperf" client $a -P "$k" -t "$T" "${r_hn[@]}" --label "$s#$rep#$m#hnperf"
            sleep 1
          fi
        done
      done ;;
    conn)
      for m in seq conc; do
        for s in "${SYSTEMS[@]}"; do
          # shellcheck disable=SC2046
          measure conn.jsonl "$s#$rep#$m" "$s" \
            "$PY" "$HERE/bench_conn.py" $m $(echo_args "$s") -n "$N" -c "$C" --label "$s#$rep#$m"
          sleep 2   # let TIME_WAIT / relay cleanup settle a little
        done
      done ;;
    hold)
      for s in "${SYSTEMS[@]}"; do
        hold=("$PY" "$HERE/bench_conn.py" hold -n "$HOLD_N" -c "$C" --label "$s#$rep#hold")
        case $s in
        haproxy)  # long-lived (it has served the other phases): reference only
          hold+=("$H:27001" --server-pids "$(pid haproxy)") ;;
        homenet)  # fresh node process
          start_node node_hold $HOLD_NODE_PORT
          hold+=("$H:$HOLD_NODE_PORT" "--homenet=$H:7001" --server-pids "$(pid node_hold)") ;;
        homenet-listen)  # fresh node + fresh listen; server = node, client = listen
          start_node node_hold $HOLD_NODE_PORT
          start_listen listen_hold $HOLD_NODE_PORT 7001 $HOLD_L_ECHO
          hold+=("$H:$HOLD_L_ECHO" --server-pids "$(pid node_hold)" --client-pids "$(pid listen_hold)") ;;
        *) continue ;;
        esac
        sleep 1
        timeout 300 "${hold[@]}" | tee -a "$OUT/hold.jsonl" | cut -c1-220 >&2
        for name in listen_hold node_hold; do died $name "$OUT/events.txt"; done
        stop_hn listen_hold; stop_hn node_hold
        sleep 2
      done ;;
    esac
  done
done

ensure_up
for f in "$LOG"/node*.out "$LOG"/listen*.out; do  # anything the node logged at warning+
    [ -s "$f" ] && grep -v -e '^READY' -e '^LISTENING' "$f" | head -5 | sed "s|^|$(basename "$f"): |" >&2
done
"$PY" "$HERE/summarize.py" "$OUT" | tee "$OUT/summary.txt"
if [ -s "$OUT/events.txt" ]; then
    echo; echo "EVENTS (a HomeNet process died during the run; measurements after it used a restarted one):"
    cat "$OUT/events.txt"
fi | tee -a "$OUT/summary.txt"
echo "results: $OUT" >&2
