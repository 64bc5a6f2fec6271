#!/usr/bin/env bash
# Fleet benchmark: connection setup and throughput through a non-owner relay (one internal
# hop to the owner) vs the owner itself, in one run, repetitions interleaved.
#
#   bench/run_fleet.sh [OUTDIR]       (default OUTDIR: $BP/results/fleet-DATE-TIME, BP=/tmp/hnb-fleet)
#
# Two relays, peered with one fleet key, on the same port of two loopback addresses:
#   relay_a  homenet node --bind 127.0.0.31 --port 16972 --peers 127.0.0.32:16972 (the owner)
#   relay_b  homenet node --bind 127.0.0.32 --port 16972 --peers 127.0.0.31:16972
#            (both: --fleet-key-file --rl-auth open --connect-auth none --no-mdns, one keys
#            file with an admin key for `hnctl peers`)
# and two one-service homes registered directly on relay_a (warm pool 4):
#   rl_echo  homenet rl hn://127.0.0.31:16972 --to 127.0.0.1:ECHO_PORT --listen-id h1
#   rl_sink  homenet rl hn://127.0.0.31:16972 --to 127.0.0.1:SINK_PORT --listen-id s1
# The client sends `HN/1 CONNECT h1` (resp. s1) to relay_a ("owner": the relay serves it from
# the listener's pool) or to relay_b ("non-owner": relay_b finds h1 in its copy of relay_a's
# directory and opens one signed, forwarded data-plane hop to relay_a, which serves it).
# Phases (for each repetition, owner then non-owner):
#   tput   hnperf client -M -P 1 -t T to the hnperf sink through s1 (TPUT_MODES, default P1)
#   conn   bench_conn.py seq (N sequential: connect, 1 byte, echo, close) and conc (C
#          concurrent clients, N in total) through h1
# Every measurement also records the CPU of relay_a, relay_b and the two homes, and relay_b's
# `forwarded` counter for relay_a before/after (hnctl peers --json), so a non-owner row proves
# it went over the hop. Output: OUTDIR/tput_hnperf.jsonl, conn.jsonl, cpu.jsonl, fwd.jsonl,
# peers.json (both relays' view at the end), env.txt, events.txt, summary.txt
# (bench/summarize_fleet.py OUTDIR re-prints it).
#
# Environment (all optional):
#   REPS=3 T=10 N=2000 C=50 PHASES="tput conn" TPUT_MODES="P1" CONN_MODES="seq conc"
#   BP=/tmp/hnb-fleet RELAY_PORT=16972 ECHO_PORT=7121 IPERF_PORT=5221 SINK_PORT=5321
#   HOMENET=.venv/bin/homenet HNCTL=.venv/bin/hnctl
# Installs iperf3/gcc if missing (bench/peers.sh setup: its Debian packages and frp, unused
# here). Every process is started by this script, recorded by PID under $BP/run and stopped by
# PID at the end (also on Ctrl-C); `BP=/tmp/hnb-fleet bench/peers.sh stop` cleans up after a
# killed run.
# shellcheck source-path=SCRIPTDIR
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HN=${HOMENET:-$ROOT/.venv/bin/homenet}
HNCTL=${HNCTL:-$(dirname "$HN")/hnctl}
PY=${PYTHON:-$ROOT/.venv/bin/python}
export BP=${BP:-/tmp/hnb-fleet}
RUN=$BP/run LOG=$BP/log
OUT=${1:-$BP/results/fleet-$(date +%Y%m%d-%H%M%S)}
REPS=${REPS:-3} T=${T:-10} N=${N:-2000} C=${C:-50}
PHASES=${PHASES:-"tput conn"}
TPUT_MODES=${TPUT_MODES:-"P1"}
CONN_MODES=${CONN_MODES:-"seq conc"}
export ECHO_PORT=${ECHO_PORT:-7121} IPERF_PORT=${IPERF_PORT:-5221} SINK_PORT=${SINK_PORT:-5321}
RELAY_PORT=${RELAY_PORT:-16972}
H=127.0.0.1 A=127.0.0.31 B=127.0.0.32
VIAS=(owner non-owner)
PORTS=("$ECHO_PORT" "$IPERF_PORT" "$SINK_PORT" "$RELAY_PORT")

has() { local x; for x in "${@:2}"; do [ "$x" = "$1" ] && return 0; done; return 1; }
mkdir -p "$OUT" "$RUN" "$LOG"
ulimit -n 20000 2>/dev/null || true
# shellcheck source=lib.sh
. "$HERE/lib.sh"
check_ports "${PORTS[@]}"
: >"$OUT/events.txt"

"$HERE/peers.sh" setup >"$LOG/setup.out" 2>&1 || { cat "$LOG/setup.out" >&2; echo "peers.sh setup failed" >&2; exit 1; }
[ -x "$HN" ] || { echo "no HomeNet at $HN (make the project venv first)" >&2; exit 1; }
[ -x "$HNCTL" ] || { echo "no hnctl at $HNCTL" >&2; exit 1; }

# -- keys: one fleet key for both relays, one admin key (hnctl) in a keys file both accept ------
KEYS=$BP/keys
rm -rf "$KEYS"; mkdir -p "$KEYS"; chmod 700 "$KEYS"
"$HN" key fleet >"$KEYS/fleet.key" 2>"$LOG/key.err" || { cat "$LOG/key.err" >&2; exit 1; }
"$HN" key --keys-file "$KEYS/keys.toml" new admin --role admin >"$KEYS/admin.key" 2>>"$LOG/key.err" \
    || { cat "$LOG/key.err" >&2; exit 1; }
chmod 600 "$KEYS"/*.key

# -- HomeNet processes: NAME -> PID file $RUN/NAME.pid, log $LOG/NAME.out, fresh state dir -----
hn_start() {  # hn_start NAME
    local name=$1 st=$BP/state/$1
    local relay=(--port "$RELAY_PORT" --fleet-key-file "$KEYS/fleet.key" --keys-file "$KEYS/keys.toml"
                 --no-mdns --rl-auth open --connect-auth none --log-level warning --state-dir "$st")
    rm -rf "$st"; mkdir -p "$st"
    case $name in
    relay_a) start_hn "$name" READY "$HN" node --bind $A --peers "$B:$RELAY_PORT" "${relay[@]}" ;;
    relay_b) start_hn "$name" READY "$HN" node --bind $B --peers "$A:$RELAY_PORT" "${relay[@]}" ;;
    rl_echo) start_hn "$name" LISTENING "$HN" rl "hn://$A:$RELAY_PORT" --to "$H:$ECHO_PORT" --listen-id h1 \
                --pool-size 4 --state-dir "$st" --log-level warning ;;
    rl_sink) start_hn "$name" LISTENING "$HN" rl "hn://$A:$RELAY_PORT" --to "$H:$SINK_PORT" --listen-id s1 \
                --pool-size 4 --state-dir "$st" --log-level warning ;;
    *) echo "hn_start: unknown $name" >&2; exit 1 ;;
    esac
}
LONG=(relay_a relay_b rl_echo rl_sink)
peers_json() {  # peers_json RELAY_HOST : its `hnctl peers --json` (empty on failure)
    "$HNCTL" --node "$1:$RELAY_PORT" --key-file "$KEYS/admin.key" --timeout 3 peers --json 2>>"$LOG/hnctl.err"
}
fleet_state() {  # fleet_state : "A_STATE A_LISTENERS_OF_B B_STATE B_LISTENERS_OF_A B_FORWARDED"
    local ja jb
    ja=$(peers_json $A) jb=$(peers_json $B)
    JA=$ja JB=$jb "$PY" -c '
import json, os
def view(s):
    try:
        p = json.loads(s)["peers"][0]
        return p["state"], p["listeners"], p["forwarded"]
    except Exception:
        return "none", -1, -1
a, b = view(os.environ["JA"]), view(os.environ["JB"])
print(a[0], a[1], b[0], b[1], b[2])'
}
wait_fleet() {  # wait_fleet [N] : both peers up, relay_b sees N (default 2: h1, s1) of relay_a's listeners
    local st want=${1:-2}
    for _ in $(seq 1 100); do
        read -r -a st <<<"$(fleet_state)"
        [ "${st[0]}" = up ] && [ "${st[2]}" = up ] && [ "${st[3]}" = "$want" ] && return 0
        sleep 0.2
    done
    echo "the fleet did not converge in 20 s: relay_a sees ${st[0]} (${st[1]}), relay_b sees ${st[2]} (${st[3]} listeners)" \
        | tee -a "$OUT/events.txt" >&2
    return 1
}
ensure_up() {  # restart a HomeNet process that died (recorded in events.txt), wait for the fleet
    local name restarted=0
    for name in "${LONG[@]}"; do
        if died "$name" "$OUT/events.txt"; then
            hn_start "$name"
            echo "restarted $name at $(date +%T)" | tee -a "$OUT/events.txt" >&2
            restarted=1
        fi
    done
    [ $restarted = 0 ] || { sleep 3; wait_fleet; }  # homes re-register (backoff <= 1.5 s)
}
forwarded() {  # forwarded : relay_b's count of hops forwarded to relay_a
    local st
    read -r -a st <<<"$(fleet_state)"
    echo "${st[4]}"
}

# -- measuring ---------------------------------------------------------------------------------
relay_of() { case $1 in owner) echo $A ;; non-owner) echo $B ;; esac; }
cpu_ticks() { local f; f=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }; awk '{print $12 + $13}' <<<"$f"; }
measure() {  # measure FILE LABEL -- CMD... : run CMD, append its JSON, the CPU of each process and
             # relay_b's forwarded counter before/after
    local file=$1 label=$2 n p f0 f1 t0 t1 c0=() c1=()
    shift 3
    ensure_up
    f0=$(forwarded)
    for n in "${LONG[@]}"; do c0+=("$(cpu_ticks "$(pid "$n")")"); done
    t0=$(date +%s.%N)
    timeout $((T + 300)) "$@" | tee -a "$OUT/$file" | cut -c1-230 >&2
    t1=$(date +%s.%N)
    for n in "${LONG[@]}"; do c1+=("$(cpu_ticks "$(pid "$n")")"); done
    f1=$(forwarded)
    p=$(for i in "${!LONG[@]}"; do printf '"%s_cpu_s": %s, ' "${LONG[i]}" \
        "$(awk -v a="${c0[i]}" -v b="${c1[i]}" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (b - a) / hz }')"; done)
    printf '{"label": "%s", %s"wall_s": %s}\n' "$label" "$p" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')" >>"$OUT/cpu.jsonl"
    printf '{"label": "%s", "forwarded_before": %s, "forwarded_after": %s}\n' "$label" "${f0:--1}" "${f1:--1}" \
        >>"$OUT/fwd.jsonl"
}

# -- start ---------------------------------------------------------------------------------------
log "starting the home services (BP=$BP) -> $OUT"
"$HERE/peers.sh" start none >"$LOG/peers.start" 2>&1 || { cat "$LOG/peers.start" >&2; exit 1; }
grep -q '^direct' "$RUN/targets.tsv" || { cat "$LOG/peers.start" >&2; exit 1; }
t0=$(date +%s.%N)
hn_start relay_a; hn_start relay_b
wait_fleet 0 || exit 1
t1=$(date +%s.%N)
hn_start rl_echo; hn_start rl_sink
wait_fleet || exit 1
t2=$(date +%s.%N)
log "HomeNet: $(for n in "${LONG[@]}"; do printf '%s=%s ' "$n" "$(pid "$n")"; done)"
log "peers up $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s after start; relay_b saw both listeners $(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }') s after the homes started"
{
    echo "date: $(date -Is)"; echo "host: $(uname -srm), $(nproc) cpus"
    echo "homenet: $("$HN" --version 2>&1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet -- homenet 2>/dev/null || echo '+dirty'))"
    for n in "${LONG[@]}"; do echo "$n: $(tr '\0' ' ' <"/proc/$(pid "$n")/cmdline")"; done
    echo "python: $("$PY" -V 2>&1)"; echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "REPS=$REPS T=$T N=$N C=$C PHASES=$PHASES TPUT_MODES=$TPUT_MODES CONN_MODES=$CONN_MODES"
} >"$OUT/env.txt"

# warm-up (not recorded): the first forwarded hop, the pools, the peer channels
for v in "${VIAS[@]}"; do
    "$PY" "$HERE/bench_conn.py" seq "$(relay_of "$v"):$RELAY_PORT" --homenet-route h1 -n 100 >/dev/null
    "$BP/bin/hnperf" client "$(relay_of "$v"):$RELAY_PORT" --homenet-route s1 -M -t 1 >/dev/null
done
sleep 1

# -- phases, repetitions interleaved (owner, non-owner) -------------------------------------------
for rep in $(seq 1 "$REPS"); do
    # shellcheck disable=SC2086
    if has tput $PHASES; then
        for m in $TPUT_MODES; do
            for v in "${VIAS[@]}"; do
                lb="$v#$rep#$m#hnperf"
                measure tput_hnperf.jsonl "$lb" -- "$BP/bin/hnperf" client "$(relay_of "$v"):$RELAY_PORT" \
                    --homenet-route s1 -M -P "${m:1}" -t "$T" --label "$lb"
                sleep 1
            done
        done
    fi
    # shellcheck disable=SC2086
    if has conn $PHASES; then
        for m in $CONN_MODES; do
            for v in "${VIAS[@]}"; do
                lb="$v#$rep#$m"
                measure conn.jsonl "$lb" -- "$PY" "$HERE/bench_conn.py" "$m" "$(relay_of "$v"):$RELAY_PORT" \
                    --homenet-route h1 -n "$N" -c "$C" --label "$lb"
                sleep 2  # TIME_WAIT / relay cleanup settle a little
            done
        done
    fi
done

{ echo "{\"relay_a\": $(peers_json $A),"; echo "\"relay_b\": $(peers_json $B)}"; } >"$OUT/peers.json"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
for n in "${LONG[@]}"; do  # warnings and worse
    [ -s "$LOG/$n.out" ] && grep -v -e '^READY' -e '^LISTENING' -e '^homenet: ' "$LOG/$n.out" | head -5 \
        | sed "s|^|$n.out: |" >&2
done
"$PY" "$HERE/summarize_fleet.py" "$OUT" | tee "$OUT/summary.txt"
if [ -s "$OUT/events.txt" ]; then
    echo; echo "EVENTS (a HomeNet process died or the fleet did not converge; later measurements used a restarted one):"
    cat "$OUT/events.txt"
fi | tee -a "$OUT/summary.txt"
echo "results: $OUT" >&2
