#!/usr/bin/env bash
# Slow handshakes: latency of a real client while 1,000 slow sockets hold the public port,
# HomeNet vs haproxy (its defaults, as in bench/peers.sh), in one run, repetitions interleaved.
#
#   bench/run_slowloris.sh [OUTDIR]     (default OUTDIR: $BP/results/slowloris-DATE-TIME)
#
# Starts the C echo server (:7001) and haproxy mode tcp (:27001 -> echo) with bench/peers.sh
# (which also starts its iperf3 and hnperf sinks, unused here) and a HomeNet node (:16971,
# `--connect-auth none`, default handshake cap 256), all on 127.0.0.1. Then, for each
# repetition and each system:
#   idle    `slowloris.py probe`: PROBE_N round trips (connect, [preamble +] payload, echo back,
#           close) from 127.0.3.2, one at a time, PROBE_INTERVAL s apart (default 0.05: 200
#           probes span ~10 s, two cycles of the node's 5 s handshake timeout; 0 = back to back)
#   attack  `slowloris.py attack`: SOCKETS slow sockets from SOURCES addresses 127.0.4.1-N,
#           each trickling a payload one byte every DRIP s and reconnecting when closed
#           (HomeNet: 'HN/1', the unfinished preamble; haproxy: the same bytes, which it
#           forwards to the echo server, so --hold-on-data: echoed bytes are discarded and
#           only EOF/reset counts as a close); once all are open (+ SETTLE s), the same probe;
#           then the attack stops and its report (opened, closed by the server, how) is kept.
# Output: OUTDIR/slowloris.jsonl (one line per probe run: latencies, attacker report, relay CPU,
# connections established on the public port), env.txt, events.txt, summary.txt
# (bench/summarize_slowloris.py OUTDIR re-prints it).
#
# Environment (all optional):
#   REPS=3 PROBE_N=200 PROBE_INTERVAL=0.05 SOCKETS=1000 SOURCES=100 DRIP=0.5 SETTLE=1
#   SYSTEMS="homenet haproxy"
#   BP=/tmp/hnb-sl (runtime files: configs, logs, PID files)   NODE_PORT=16971
#   HOMENET=.venv/bin/homenet (the node command)
#   TREE=COMMIT  run the node from that commit instead of the working tree (`git archive` of
#                homenet/ into $BP/tree-COMMIT, imported first through PYTHONPATH; same venv):
#                e.g. TREE=HEAD (without the uncommitted edits) or TREE=325ce70 (accept paused
#                at the cap, before the early drop)
# Installs haproxy/iperf3/gcc if missing (apt-get). Every process is started by this script,
# recorded by PID under $BP/run and stopped by PID at the end (also on Ctrl-C);
# `BP=/tmp/hnb-sl bench/peers.sh stop` cleans up after a killed run.
# shellcheck source-path=SCRIPTDIR
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HN=${HOMENET:-$ROOT/.venv/bin/homenet}
PY=${PYTHON:-$ROOT/.venv/bin/python}
export BP=${BP:-/tmp/hnb-sl}
RUN=$BP/run LOG=$BP/log
OUT=${1:-$BP/results/slowloris-$(date +%Y%m%d-%H%M%S)}
REPS=${REPS:-3} PROBE_N=${PROBE_N:-200} PROBE_INTERVAL=${PROBE_INTERVAL:-0.05} SOCKETS=${SOCKETS:-1000} SOURCES=${SOURCES:-100}
DRIP=${DRIP:-0.5} SETTLE=${SETTLE:-1}
read -r -a SYSTEMS <<<"${SYSTEMS:-homenet haproxy}"
H=127.0.0.1
NODE_PORT=${NODE_PORT:-16971}
PROBE_SOURCE=127.0.3.2 ATTACK_PREFIX=127.0.4.
HN_LINE='HN/1 CONNECT 127.0.0.1:7001\n'  # slowloris.py probe decodes the \n
PORTS=(7001 5201 5301 27001 25201 25301 "$NODE_PORT")

mkdir -p "$OUT" "$RUN" "$LOG"
ulimit -n 20000 2>/dev/null || true
[ "$(ulimit -n)" -ge $((SOCKETS * 2 + 200)) ] || { echo "ulimit -n $(ulimit -n) is too low for SOCKETS=$SOCKETS" >&2; exit 1; }

# -- install what is missing (Debian packages; the way bench/peers.sh setup does it) ------------
missing=()
for c in haproxy:haproxy iperf3:iperf3 gcc:gcc; do
    command -v "${c%%:*}" >/dev/null || missing+=("${c#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (apt-get)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
        || { echo "apt-get install ${missing[*]} failed" >&2; exit 1; }
fi
[ -x "$HN" ] || { echo "no HomeNet at $HN (make the project venv first)" >&2; exit 1; }
TREE_DESC="working tree $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet -- homenet 2>/dev/null || echo '+dirty')"
if [ -n "${TREE:-}" ]; then  # the node from one commit: homenet/ of it, first on the path
    rev=$(git -C "$ROOT" rev-parse --short "$TREE^{commit}") || { echo "no commit $TREE" >&2; exit 1; }
    tree=$BP/tree-$rev
    if [ ! -d "$tree/homenet" ]; then
        rm -rf "$tree.tmp"; mkdir -p "$tree.tmp"
        if ! git -C "$ROOT" archive "$rev" homenet | tar -x -C "$tree.tmp"; then
            echo "git archive $rev failed" >&2; exit 1
        fi
        mv "$tree.tmp" "$tree"
    fi
    printf '#!/bin/sh\nPYTHONPATH=%s exec %s -P -c "import sys; from homenet.cli.main import main; sys.exit(main())" "$@"\n' \
        "$tree" "$PY" >"$tree/homenet.sh"
    chmod +x "$tree/homenet.sh"
    HN=$tree/homenet.sh
    got=$(PYTHONPATH=$tree "$PY" -P -c 'import homenet; print(homenet.__file__)')
    [ "$got" = "$tree/homenet/__init__.py" ] || { echo "TREE: imports $got, not $tree" >&2; exit 1; }
    TREE_DESC="commit $rev ($(git -C "$ROOT" log -1 --format=%s "$rev" | cut -c1-80))"
fi

# shellcheck source=lib.sh
. "$HERE/lib.sh"
check_ports "${PORTS[@]}"
ATTACK_IN=$RUN/attack.stdin
STARTED+=(attack)  # cleanup stops a running attacker by its PID file too
: >"$OUT/events.txt"

# -- helpers ---------------------------------------------------------------------------------
cpu_s() {  # cpu_s PID : utime+stime of the process, in seconds
    local f
    f=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    awk -v t="$(echo "$f" | awk '{print $12 + $13}')" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}
public_port() { case $1 in homenet) echo "$NODE_PORT";; haproxy) echo 27001;; esac; }
relay_pid() { case $1 in homenet) pid node;; haproxy) pid haproxy;; esac; }
established() {  # established PORT : connections established on the server side of PORT
    ss -Htn state established "sport = :$1" | wc -l
}
ensure_node() {  # restart the node if it has died (and record it)
    died node "$OUT/events.txt" || return 0
    start_node node "$NODE_PORT"
    echo "restarted the node at $(date +%T)" | tee -a "$OUT/events.txt" >&2
}
probe() {  # probe SYSTEM : PROBE_N round trips from PROBE_SOURCE; one JSON line (or an error one)
    local args=(probe "$H" "$(public_port "$1")" --tries "$PROBE_N" --source "$PROBE_SOURCE"
                --interval "$PROBE_INTERVAL") out
    [ "$1" = homenet ] && args+=(--line "$HN_LINE")
    if out=$(timeout "$(awk -v n="$PROBE_N" -v i="$PROBE_INTERVAL" 'BEGIN { print int(n * (31 + i) + 30) }')" "$PY" "$HERE/slowloris.py" "${args[@]}" 2>"$LOG/probe.err" 3>&-) && [ -n "$out" ]; then
        echo "$out"
    else
        printf '{"error": "%s"}\n' "$(tail -1 "$LOG/probe.err" | tr -d '\042\134' | cut -c1-200)"
    fi
}
attack_start() {  # attack_start SYSTEM : slow sockets against its public port; wait for OPEN
    local args=(attack "$H" "$(public_port "$1")" --sockets "$SOCKETS" --sources "$SOURCES"
                --prefix "$ATTACK_PREFIX" --drip "$DRIP")
    [ "$1" = haproxy ] && args+=(--hold-on-data)  # the echo comes back through haproxy
    rm -f "$ATTACK_IN"; mkfifo "$ATTACK_IN"
    : >"$LOG/attack.out"
    "$PY" "$HERE/slowloris.py" "${args[@]}" <"$ATTACK_IN" >>"$LOG/attack.out" 2>&1 &
    echo $! >"$RUN/attack.pid"
    exec 3>"$ATTACK_IN"  # its stdin: the attack runs until we close this
    for _ in $(seq 1 600); do
        grep -q '^OPEN' "$LOG/attack.out" && return 0
        alive "$(pid attack)" || break
        sleep 0.1
    done
    echo "the attack on $1 did not open $SOCKETS sockets within 60 s: $(tail -3 "$LOG/attack.out" | tr '\n' '|')" \
        | tee -a "$OUT/events.txt" >&2
    return 1
}
ATTACK_REPORT=null
attack_stop() {  # attack_stop : close the attacker's stdin, wait for its report -> ATTACK_REPORT
                 # (not in a subshell: fd 3 and `wait` are this shell's)
    local p
    p=$(pid attack)
    exec 3>&-
    for _ in $(seq 1 100); do alive "$p" || break; sleep 0.1; done
    stop_pid "$p"  # TERM (it reports on SIGTERM too) if still running; reaps it
    rm -f "$RUN/attack.pid" "$ATTACK_IN"
    ATTACK_REPORT=$(grep '^{' "$LOG/attack.out" | tail -1)
    [ -n "$ATTACK_REPORT" ] || ATTACK_REPORT=null
}
record() {  # record SYSTEM REP PHASE PROBE_JSON ATTACK_JSON CPU_S WALL_S ESTABLISHED
    printf '{"label": "%s#%s#%s", "system": "%s", "rep": %s, "phase": "%s", "probe": %s, "attacker": %s, "relay_cpu_s": %s, "wall_s": %s, "established": %s}\n' \
        "$1" "$2" "$3" "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" >>"$OUT/slowloris.jsonl"
    printf '%-8s rep %s %-6s %s | attacker %s | relay CPU %ss / %ss wall | %s established\n' \
        "$1" "$2" "$3" "$(cut -c1-80 <<<"$4")" "$5" "$6" "$7" "$8" >&2
}
one() {  # one SYSTEM REP : idle probe, then the probe under attack
    local s=$1 rep=$2 port relay c0 t0 p c1 t1 est
    [ "$s" = homenet ] && ensure_node
    port=$(public_port "$s") relay=$(relay_pid "$s")
    c0=$(cpu_s "$relay"); t0=$(date +%s.%N)
    p=$(probe "$s")
    c1=$(cpu_s "$relay"); t1=$(date +%s.%N)
    record "$s" "$rep" idle "$p" null "$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')" "$(established "$port")"
    if attack_start "$s"; then
        sleep "$SETTLE"
        est=$(established "$port")
        c0=$(cpu_s "$relay"); t0=$(date +%s.%N)
        p=$(probe "$s")
        c1=$(cpu_s "$relay"); t1=$(date +%s.%N)
    else
        est=$(established "$port") p='{"error": "attack did not open"}' c0=0 c1=0 t0=0 t1=0
    fi
    attack_stop
    record "$s" "$rep" attack "$p" "$ATTACK_REPORT" "$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')" "$est"
    [ "$s" = homenet ] && ensure_node  # the attack may have killed it: record, restart
    # let the closed sockets drain (haproxy closes SOCKETS proxied pairs, the node its churn)
    for _ in $(seq 1 50); do [ "$(established "$port")" -lt 10 ] && break; sleep 0.2; done
    sleep 1
}

# -- start -----------------------------------------------------------------------------------
log "starting the echo server and haproxy (BP=$BP)"
"$HERE/peers.sh" start haproxy >"$LOG/peers.start" 2>&1 || { cat "$LOG/peers.start" >&2; exit 1; }
grep -q '^haproxy' "$RUN/targets.tsv" || { cat "$LOG/peers.start" >&2; exit 1; }
start_node node "$NODE_PORT"
log "node pid $(pid node), haproxy pid $(pid haproxy) -> $OUT"
{
    echo "date: $(date -Is)"; echo "host: $(uname -srm), $(nproc) cpus"
    echo "homenet: $HN: $("$HN" --version 2>&1), $TREE_DESC"
    echo "node: $(tr '\0' ' ' <"/proc/$(pid node)/cmdline")"
    echo "haproxy: $(haproxy -v | head -1); config: $BP/haproxy/haproxy.cfg (bench/peers.sh)"
    echo "python: $("$PY" -V 2>&1)"; echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "REPS=$REPS PROBE_N=$PROBE_N PROBE_INTERVAL=$PROBE_INTERVAL SOCKETS=$SOCKETS SOURCES=$SOURCES DRIP=$DRIP SETTLE=$SETTLE SYSTEMS=${SYSTEMS[*]}"
    echo "attack: ${ATTACK_PREFIX}1-$SOURCES; probe from $PROBE_SOURCE; HomeNet probe line: $HN_LINE"
} >"$OUT/env.txt"
cp "$BP/haproxy/haproxy.cfg" "$OUT/haproxy.cfg"

for rep in $(seq 1 "$REPS"); do
    for s in "${SYSTEMS[@]}"; do
        one "$s" "$rep"
    done
done

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
[ -s "$LOG/node.out" ] && grep -v -e '^READY' "$LOG/node.out" | sort | uniq -c | sort -rn | head -5 \
    | sed 's|^|node.out: |' >&2
"$PY" "$HERE/summarize_slowloris.py" "$OUT" | tee "$OUT/summary.txt"
if [ -s "$OUT/events.txt" ]; then
    echo; echo "EVENTS:"; cat "$OUT/events.txt"
fi | tee -a "$OUT/summary.txt"
echo "results: $OUT" >&2
