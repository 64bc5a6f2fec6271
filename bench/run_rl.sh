#!/usr/bin/env bash
# Remote Listen benchmark: HomeNet (relay + home node) side by side with frp and `ssh -R`.
#
#   bench/run_rl.sh [OUTDIR]          (default OUTDIR: $BP/results/DATE-TIME, BP=/tmp/hnb-rl)
#
# client -> public relay -> home agent -> home service, everything on 127.0.0.1:
#   frp        frps (:7000) + frpc, frp 0.65 defaults (TLS + tcpMux); public ports 24701 echo,
#              24521 iperf3, 24531 sink (bench/peers.sh)
#   ssh        sshd (:2222) + `ssh -N -R` (default cipher); public ports 23701, 23521, 23531
#   hn-pool    relay `homenet node --port 16970 --rl-auth open` + home `homenet node --rl
#              hn://127.0.0.1:16970 --listen-id home` (warm pool: default 4); the client
#              pipelines `HN/1 CONNECT home` + `HN/1 CONNECT 127.0.0.1:PORT` + payload
#   hn-nopool  the same with a second home node `--listen-id home0 --pool-size 0`: every
#              client waits for a dial-back round trip
#   hn-rl      `homenet rl hn://127.0.0.1:16970 --to 127.0.0.1:PORT --listen-id echo` (one
#              listener per service, like frp): one `HN/1 CONNECT echo` hop
# Phases (repetitions interleaved across systems):
#   tput   hnperf (bench/hnperf.c, same client and sink for every row; end-of-stream marker
#          -M since frp does not carry a half-close), TPUT_MODES streams; iperf3 IPERF_MODES
#          (HomeNet rows through `homenet listen`, since iperf3 cannot speak the preamble)
#   conn   seq (N sequential connections; SSH_N for ssh, whose forwarded connections stall
#          on Nagle/delayed ACK ~40 ms each) and conc (C concurrent clients, N in total)
#   hold   HOLD_N connections held idle, RSS/PSS of relay + home agent; FRESH processes per
#          system and repetition (the long-lived ones are stopped first)
#   profile (not default) seq of PROFILE_SYSTEMS, bare, then under each of PROFILERS attached
#          to the relay and the home agent -> OUTDIR/profile.jsonl (conn/s, CPU) and
#          OUTDIR/profile/SYSTEM.{relay,home}.{pyspy,perf,strace}.txt
# Environment (all optional):
#   REPS=3 T=10 N=2000 SSH_N=300 C=50 HOLD_N=1000 PHASES="tput conn hold"
#   TPUT_MODES="P1 P8" IPERF_MODES="P1" SYSTEMS="frp ssh hn-pool hn-nopool hn-rl"
#   PROFILE_N=3000 PROFILE_SYSTEMS="hn-pool hn-rl" PROFILERS="pyspy perf" PYSPY_ARGS=--native
#   BP=/tmp/hnb-rl ECHO_PORT=7101 IPERF_PORT=5211 SINK_PORT=5311 (home services: own ports,
#   so this never meets bench/run.sh's 7001/5201/5301)
# Installs frp on first use (bench/peers.sh setup). Every process is started by this script,
# recorded by PID under $BP/run and stopped by PID at the end (also on Ctrl-C);
# `BP=/tmp/hnb-rl bench/peers.sh stop` cleans up after a killed run.
# shellcheck source-path=SCRIPTDIR
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HN=${HOMENET:-$ROOT/.venv/bin/homenet}
PY=${PYTHON:-$ROOT/.venv/bin/python}
PYSPY=${PYSPY:-$ROOT/.venv/bin/py-spy}
export BP=${BP:-/tmp/hnb-rl}
RUN=$BP/run LOG=$BP/log
OUT=${1:-$BP/results/$(date +%Y%m%d-%H%M%S)}
REPS=${REPS:-3} T=${T:-10} N=${N:-2000} SSH_N=${SSH_N:-300} C=${C:-50} HOLD_N=${HOLD_N:-1000}
PHASES=${PHASES:-"tput conn hold"}
TPUT_MODES=${TPUT_MODES:-"P1 P8"}
IPERF_MODES=${IPERF_MODES:-"P1"}
read -r -a SYSTEMS <<<"${SYSTEMS:-frp ssh hn-pool hn-nopool hn-rl}"
PROFILE_N=${PROFILE_N:-3000}
read -r -a PROFILE_SYSTEMS <<<"${PROFILE_SYSTEMS:-hn-pool hn-rl}"
PROFILERS=${PROFILERS:-pyspy}  # pyspy, perf (native + kernel symbols, by DSO), strace (counts)
PYSPY_ARGS=${PYSPY_ARGS:-}  # e.g. --native (C frames; pauses the process at each sample)
export ECHO_PORT=${ECHO_PORT:-7101} IPERF_PORT=${IPERF_PORT:-5211} SINK_PORT=${SINK_PORT:-5311}
export SSH_AES=0  # peers.sh: only the default-cipher ssh -R
H=127.0.0.1
RELAY_PORT=16970
L_POOL=18311 L_NOPOOL=18312 L_RL=18313  # `homenet listen` ports (iperf3 rows)
PORTS=("$ECHO_PORT" "$IPERF_PORT" "$SINK_PORT" 7000 24701 24521 24531 2222 23701 23521 23531
       "$RELAY_PORT" "$L_POOL" "$L_NOPOOL" "$L_RL")

has() { local x; for x in "${@:2}"; do [ "$x" = "$1" ] && return 0; done; return 1; }
mkdir -p "$OUT" "$RUN" "$LOG"
ulimit -n 20000 2>/dev/null || true
# shellcheck source=lib.sh
. "$HERE/lib.sh"
check_ports "${PORTS[@]}"
EXTRA_PIDS=()  # profilers (py-spy, perf, strace) while they run
rl_cleanup() {
    local p
    for p in "${EXTRA_PIDS[@]}"; do kill -INT "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    cleanup
}
trap rl_cleanup EXIT

# -- install (a fresh machine: Debian packages and frp from PyPI) ------------------------------
"$HERE/peers.sh" setup || { echo "peers.sh setup failed" >&2; exit 1; }
[ -x "$HN" ] || { echo "no HomeNet at $HN (make the project venv first)" >&2; exit 1; }

# -- HomeNet processes ---------------------------------------------------------------------------
# Each has a name (PID file $RUN/NAME.pid, log $LOG/NAME.out) and a fresh state dir.
hn_start() {  # hn_start NAME : start the HomeNet process NAME (see the case below)
    local name=$1 st=$BP/state/$1 relay=hn://$H:$RELAY_PORT
    local common=(--no-mdns --log-level warning --state-dir "$st")
    rm -rf "$st"; mkdir -p "$st"
    case $name in
    relay*) start_hn "$name" READY "$HN" node --bind $H --port $RELAY_PORT "${common[@]}" --rl-auth open ;;
    home0*) start_hn "$name" LISTENING "$HN" node --bind $H --port 0 "${common[@]}" --rl "$relay" \
                --listen-id home0 --allow 127.0.0.1/32 --connect-auth none --pool-size 0 ;;
    home*) start_hn "$name" LISTENING "$HN" node --bind $H --port 0 "${common[@]}" --rl "$relay" \
                --listen-id home --allow 127.0.0.1/32 --connect-auth none ;;
    rl_echo*) start_hn "$name" LISTENING "$HN" rl "$relay" --to $H:"$ECHO_PORT" --listen-id echo \
                --state-dir "$st" --log-level warning ;;
    rl_sink) start_hn "$name" LISTENING "$HN" rl "$relay" --to $H:"$SINK_PORT" --listen-id sink \
                --state-dir "$st" --log-level warning ;;
    rl_iperf) start_hn "$name" LISTENING "$HN" rl "$relay" --to $H:"$IPERF_PORT" --listen-id iperf \
                --state-dir "$st" --log-level warning ;;
    listen_pool) start_hn "$name" LISTENING "$HN" listen "$relay/home/$H:$IPERF_PORT" --bind $H \
                --port $L_POOL --log-level warning ;;
    listen_nopool) start_hn "$name" LISTENING "$HN" listen "$relay/home0/$H:$IPERF_PORT" --bind $H \
                --port $L_NOPOOL --log-level warning ;;
    listen_rl) start_hn "$name" LISTENING "$HN" listen "$relay/iperf" --bind $H --port $L_RL \
                --log-level warning ;;
    *) echo "hn_start: unknown $name" >&2; exit 1 ;;
    esac
}
LONG=()  # long-lived HomeNet processes and peers (tput, conn, profile), in start order
peers=()
# shellcheck disable=SC2086
if has tput $PHASES || has conn $PHASES || has profile $PHASES; then
    has hn-pool "${SYSTEMS[@]}" && LONG+=(home listen_pool)
    has hn-nopool "${SYSTEMS[@]}" && LONG+=(home0 listen_nopool)
    has hn-rl "${SYSTEMS[@]}" && LONG+=(rl_echo rl_sink rl_iperf listen_rl)
    [ ${#LONG[@]} -gt 0 ] && LONG=(relay "${LONG[@]}")
    has frp "${SYSTEMS[@]}" && peers+=(frp)
    has ssh "${SYSTEMS[@]}" && peers+=(ssh)
fi
ensure_up() {  # restart a long-lived HomeNet process that died (recorded in events.txt)
    local name
    for name in "${LONG[@]}"; do
        if died "$name" "$OUT/events.txt"; then
            hn_start "$name"
            [ "$name" = relay ] && sleep 3  # listeners re-register (backoff <= 1.5 s)
            echo "restarted $name at $(date +%T)" | tee -a "$OUT/events.txt" >&2
        fi
    done
}

# -- which processes make up each system --------------------------------------------------------
pidf() { cat "$RUN/$1.pid" 2>/dev/null; }
relay_pids() {  # relay_pids SYSTEM : the public side
    case $1 in
    frp) pidf frps ;; ssh) pidf sshd_2222 ;; hn-*) pidf relay ;;
    esac
}
home_pids() {  # home_pids SYSTEM : the home agent(s)
    case $1 in
    frp) pidf frpc ;; ssh) pidf ssh_client ;; hn-pool) pidf home ;; hn-nopool) pidf home0 ;;
    hn-rl) echo "$(pidf rl_echo) $(pidf rl_sink) $(pidf rl_iperf)" ;;
    esac
}
listen_pid() {  # listen_pid SYSTEM : the `homenet listen` of the iperf3 rows
    case $1 in
    hn-pool) pidf listen_pool ;; hn-nopool) pidf listen_nopool ;; hn-rl) pidf listen_rl ;;
    esac
}
measure() {  # measure FILE LABEL SYSTEM [iperf] -- CMD... : run CMD, append its JSON and the CPU
    local file=$1 label=$2 sys=$3 with_listen=0 r h l r0 h0 l0 t0 t1
    shift 3
    [ "$1" = iperf ] && { with_listen=1; shift; }
    shift  # --
    case $sys in hn-*) ensure_up ;; esac
    read -r -a r <<<"$(relay_pids "$sys")"; read -r -a h <<<"$(home_pids "$sys")"
    l=(); [ $with_listen = 1 ] && read -r -a l <<<"$(listen_pid "$sys")"
    r0=$(tree_cpu "${r[@]}"); h0=$(tree_cpu "${h[@]}"); l0=$(tree_cpu "${l[@]}"); t0=$(date +%s.%N)
    timeout $((T + 120)) "$@" | tee -a "$OUT/$file" | cut -c1-230 >&2
    t1=$(date +%s.%N)
    awk -v lb="$label" -v r0="$r0" -v r1="$(tree_cpu "${r[@]}")" -v h0="$h0" -v h1="$(tree_cpu "${h[@]}")" \
        -v l0="$l0" -v l1="$(tree_cpu "${l[@]}")" -v t0="$t0" -v t1="$t1" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "{\"label\": \"%s\", \"relay_cpu_s\": %.2f, \"home_cpu_s\": %.2f, \"listen_cpu_s\": %.2f, \"wall_s\": %.2f}\n",
                 lb, (r1 - r0) / hz, (h1 - h0) / hz, (l1 - l0) / hz, t1 - t0 }' >>"$OUT/cpu.jsonl"
}

# -- where each system is reached --------------------------------------------------------------
sink_args() {  # hnperf client arguments
    case $1 in
    frp) echo "$H:24531" ;; ssh) echo "$H:23531" ;;
    hn-pool) echo "$H:$RELAY_PORT --homenet-route home/$H:$SINK_PORT" ;;
    hn-nopool) echo "$H:$RELAY_PORT --homenet-route home0/$H:$SINK_PORT" ;;
    hn-rl) echo "$H:$RELAY_PORT --homenet-route sink" ;;
    esac
}
iperf_addr() {
    case $1 in
    frp) echo "$H:24521" ;; ssh) echo "$H:23521" ;;
    hn-pool) echo "$H:$L_POOL" ;; hn-nopool) echo "$H:$L_NOPOOL" ;; hn-rl) echo "$H:$L_RL" ;;
    esac
}
echo_args() {  # bench_conn.py arguments
    case $1 in
    frp) echo "$H:24701" ;; ssh) echo "$H:23701" ;;
    hn-pool) echo "$H:$RELAY_PORT --homenet-route home/$H:$ECHO_PORT" ;;
    hn-nopool) echo "$H:$RELAY_PORT --homenet-route home0/$H:$ECHO_PORT" ;;
    hn-rl) echo "$H:$RELAY_PORT --homenet-route echo" ;;
    esac
}

# -- start ---------------------------------------------------------------------------------------
log "starting home services ${peers[*]} (BP=$BP) -> $OUT"
"$HERE/peers.sh" start "${peers[@]:-none}" >"$LOG/peers.start" 2>&1 || { cat "$LOG/peers.start" >&2; exit 1; }
for p in "${peers[@]}"; do
    grep -q "^$p	" "$RUN/targets.tsv" || { cat "$LOG/peers.start" >&2; exit 1; }
done
for name in "${LONG[@]}"; do hn_start "$name"; done
log "HomeNet: $(for n in "${LONG[@]}"; do printf '%s=%s ' "$n" "$(pidf "$n")"; done)"
{
    echo "date: $(date -Is)"; echo "host: $(uname -srm), $(nproc) cpus"
    echo "homenet: $("$HN" --version 2>&1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet -- homenet 2>/dev/null || echo '+dirty'))"
    echo "frp: $("$HERE/peers.sh" setup 2>&1 | tail -1)"
    echo "ssh: $(ssh -V 2>&1)"; echo "iperf3: $(iperf3 --version | head -1)"
    echo "python: $("$PY" -V 2>&1)"; echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "REPS=$REPS T=$T N=$N SSH_N=$SSH_N C=$C HOLD_N=$HOLD_N PHASES=$PHASES TPUT_MODES=$TPUT_MODES IPERF_MODES=$IPERF_MODES SYSTEMS=${SYSTEMS[*]}"
} >"$OUT/env.txt"
sleep 1  # let the warm pools fill

stop_long() {  # stop the long-lived processes (before the fresh hold runs)
    local i
    for (( i = ${#LONG[@]} - 1; i >= 0; i-- )); do stop_hn "${LONG[i]}"; done
    LONG=()
    [ ${#peers[@]} -eq 0 ] || "$HERE/peers.sh" stop-peer "${peers[@]}" >/dev/null
}
hold_one() {  # hold_one SYSTEM REP : fresh relay + agent, HOLD_N held connections, stop them
    local s=$1 rep=$2 srv cli names=() args
    case $s in
    frp|ssh) "$HERE/peers.sh" start-peer "$s" >>"$LOG/peers.start" 2>&1 || { echo "start $s failed" >&2; return 1; }
             srv=$(relay_pids "$s") cli=$(home_pids "$s") ;;
    hn-pool) names=(relay_hold home_hold) ;;
    hn-nopool) names=(relay_hold home0_hold) ;;
    hn-rl) names=(relay_hold rl_echo_hold) ;;
    esac
    if [ ${#names[@]} -gt 0 ]; then
        hn_start "${names[0]}"; hn_start "${names[1]}"
        srv=$(pidf "${names[0]}") cli=$(pidf "${names[1]}")
    fi
    sleep 2  # pools filled, registration settled
    read -r -a args <<<"$(echo_args "$s")"
    timeout 300 "$PY" "$HERE/bench_conn.py" hold "${args[@]}" -n "$HOLD_N" -c "$C" --label "$s#$rep#hold" \
        --server-pids "$srv" --client-pids "$cli" | tee -a "$OUT/hold.jsonl" | cut -c1-230 >&2
    case $s in
    frp|ssh) "$HERE/peers.sh" stop-peer "$s" >/dev/null ;;
    *) died "${names[1]}" "$OUT/events.txt"; died "${names[0]}" "$OUT/events.txt"
       stop_hn "${names[1]}"; stop_hn "${names[0]}" ;;
    esac
    sleep 1
}
profile_one() {  # profile_one SYSTEM : seq, bare then under each of PROFILERS (relay + home agent)
    local s=$1 d=$OUT/profile rp hp args prof p1 p2 t0 t1 secs w mode
    mkdir -p "$d"
    rp=$(relay_pids "$s"); hp=$(home_pids "$s" | cut -d' ' -f1)  # hn-rl: rl_echo
    read -r -a args <<<"$(echo_args "$s")"
    for prof in bare $PROFILERS; do
        case $prof in
        bare) ;;
        pyspy)
            [ -x "$PYSPY" ] || { echo "no py-spy at $PYSPY (.venv/bin/pip install py-spy)" >&2; continue; }
            mode=--nonblocking  # py-spy cannot read native stacks without pausing the process
            case " $PYSPY_ARGS " in *" --native "*) mode= ;; esac
            # shellcheck disable=SC2086
            "$PYSPY" record $mode $PYSPY_ARGS -r 200 -p "$rp" --format raw -o "$d/$s.relay.raw" \
                >"$LOG/pyspy.relay.out" 2>&1 &
            p1=$!
            # shellcheck disable=SC2086
            "$PYSPY" record $mode $PYSPY_ARGS -r 200 -p "$hp" --format raw -o "$d/$s.home.raw" \
                >"$LOG/pyspy.home.out" 2>&1 &
            p2=$! ;;
        perf)
            command -v perf >/dev/null || { echo "no perf (apt-get install linux-perf)" >&2; continue; }
            perf record -F 499 -g -p "$rp" -o "$d/$s.relay.perf.data" >"$LOG/perf.relay.out" 2>&1 &
            p1=$!
            perf record -F 499 -g -p "$hp" -o "$d/$s.home.perf.data" >"$LOG/perf.home.out" 2>&1 &
            p2=$! ;;
        strace)  # syscall counts (divide by PROFILE_N); slows the processes a lot: counts only
            command -v strace >/dev/null || { echo "no strace" >&2; continue; }
            strace -c -f -p "$rp" -o "$d/$s.relay.strace.txt" >"$LOG/strace.relay.out" 2>&1 &
            p1=$!
            strace -c -f -p "$hp" -o "$d/$s.home.strace.txt" >"$LOG/strace.home.out" 2>&1 &
            p2=$! ;;
        *) echo "unknown profiler $prof" >&2; continue ;;
        esac
        [ "$prof" = bare ] || { EXTRA_PIDS=("$p1" "$p2"); sleep 1; }
        t0=$(date +%s.%N)
        measure profile.jsonl "$s#1#seq-$prof" "$s" -- "$PY" "$HERE/bench_conn.py" seq "${args[@]}" \
            -n "$PROFILE_N" --label "$s#1#seq-$prof"
        t1=$(date +%s.%N)
        if [ "$prof" != bare ]; then
            kill -INT "$p1" "$p2" 2>/dev/null; wait "$p1" "$p2" 2>/dev/null
            EXTRA_PIDS=()
        fi
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a + 0.5 }')
        for w in relay home; do
            case $prof in
            pyspy)
                [ -s "$d/$s.$w.raw" ] || { echo "py-spy wrote no $s.$w.raw: $(tail -1 "$LOG/pyspy.$w.out")" >&2; continue; }
                "$PY" "$HERE/stacks.py" "$d/$s.$w.raw" --seconds "$secs" --rate 200 >"$d/$s.$w.pyspy.txt" 2>&1 ;;
            perf)
                {
                    echo "== by DSO (self)"
                    perf report -i "$d/$s.$w.perf.data" --no-children --sort dso --stdio -g none 2>/dev/null \
                        | grep -v -e '^#' -e '^$' | head -15
                    echo "== by symbol (self)"
                    perf report -i "$d/$s.$w.perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null \
                        | grep -v -e '^#' -e '^$' | head -50
                } >"$d/$s.$w.perf.txt" ;;
            esac
        done
        sleep 1
    done
}

# -- phases, repetitions interleaved across systems ----------------------------------------------
for phase in tput conn profile hold; do  # fixed order: hold stops the long-lived processes
  has "$phase" $PHASES || continue
  log "phase $phase"
  case $phase in
  profile)
    for s in "${PROFILE_SYSTEMS[@]}"; do has "$s" "${SYSTEMS[@]}" && profile_one "$s"; sleep 2; done
    continue ;;
  hold) stop_long; sleep 2 ;;
  esac
  for rep in $(seq 1 "$REPS"); do
    case $phase in
    tput)
      for m in $TPUT_MODES; do
        for s in "${SYSTEMS[@]}"; do
          read -r -a a <<<"$(sink_args "$s")"
          measure tput_hnperf.jsonl "$s#$rep#$m#hnperf" "$s" -- \
            "$BP/bin/hnperf" client "${a[@]}" -M -P "${m:1}" -t "$T" --label "$s#$rep#$m#hnperf"
          sleep 1
        done
      done
      for m in $IPERF_MODES; do
        for s in "${SYSTEMS[@]}"; do
          measure tput_iperf3.jsonl "$s#$rep#$m#iperf3" "$s" iperf -- \
            "$PY" "$HERE/bench_tput.py" "$(iperf_addr "$s")" -P "${m:1}" -t "$T" --label "$s#$rep#$m#iperf3"
          sleep 1
        done
      done ;;
    conn)
      for m in seq conc; do
        for s in "${SYSTEMS[@]}"; do
          n=$N; [ "$s" = ssh ] && [ $m = seq ] && n=$SSH_N
          read -r -a a <<<"$(echo_args "$s")"
          measure conn.jsonl "$s#$rep#$m" "$s" -- \
            "$PY" "$HERE/bench_conn.py" $m "${a[@]}" -n "$n" -c "$C" --label "$s#$rep#$m"
          sleep 2   # TIME_WAIT / relay cleanup settle a little
        done
      done ;;
    hold)
      for s in "${SYSTEMS[@]}"; do hold_one "$s" "$rep"; done ;;
    esac
  done
done

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
for f in "$LOG"/relay*.out "$LOG"/home*.out "$LOG"/rl_*.out "$LOG"/listen*.out; do  # warnings+
    [ -s "$f" ] && grep -v -e '^READY' -e '^LISTENING' -e '^homenet: ' -e 'INFO' "$f" | head -5 \
        | sed "s|^|$(basename "$f"): |" >&2
done
"$PY" "$HERE/summarize_rl.py" "$OUT" | tee "$OUT/summary.txt"
if [ -s "$OUT/events.txt" ]; then
    echo; echo "EVENTS (a HomeNet process died during the run; later measurements used a restarted one):"
    cat "$OUT/events.txt"
fi | tee -a "$OUT/summary.txt"
echo "results: $OUT" >&2
