# shellcheck shell=bash
# Helpers shared by bench/run.sh and bench/profile.sh (sourced, not run).
# Needs: HERE (bench dir), HN (homenet command), PY (venv python), BP, RUN, LOG, H.
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
check_ports() {  # check_ports PORT... : fail if any is already listening
    local p
    for p in "$@"; do
        if ss -ltn "sport = :$p" | grep -q LISTEN; then
            echo "port $p is already in use (a previous run? try: BP=$BP $HERE/peers.sh stop)" >&2
            exit 1
        fi
    done
}

# -- processes we start: PID files in $RUN, so `peers.sh stop` also stops them ----------------
STARTED=()
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" != Z ]; }
stop_pid() {  # stop_pid PID : TERM, wait up to 5 s, then KILL; reap it (our child)
    local pid=$1
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}
stop_hn() {  # stop_hn NAME : stop one HomeNet process started by start_hn
    local f=$RUN/$1.pid
    [ -e "$f" ] || return 0
    stop_pid "$(cat "$f")"
    rm -f "$f"
}
cleanup() {
    trap - EXIT INT TERM
    for name in "${STARTED[@]}"; do stop_hn "$name"; done
    "$HERE/peers.sh" stop >/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_hn() {  # start_hn NAME WANT_LINE CMD... : start a HomeNet process, wait for its ready line
    local name=$1 want=$2; shift 2
    : >"$LOG/$name.out"
    "$@" >>"$LOG/$name.out" 2>&1 &
    echo $! >"$RUN/$name.pid"
    STARTED+=("$name")
    for _ in $(seq 1 200); do
        grep -q "^$want" "$LOG/$name.out" && return 0
        alive "$(cat "$RUN/$name.pid")" || break
        sleep 0.1
    done
    echo "homenet $name did not become ready:" >&2
    cat "$LOG/$name.out" >&2
    exit 1
}
tree_cpu() {  # tree_cpu PID... : utime+stime of the process trees (forks, workers), clock ticks
    [ $# -gt 0 ] || { echo 0; return; }
    local p total=0 f
    for p in $(ps -e -o pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) want[r[i]] = 1 }
        { kids[$2] = kids[$2] " " $1 }
        END { for (p in want) q[++t] = p
              for (h = 1; h <= t; h++) { print q[h]; m = split(kids[q[h]], k, " ")
                                         for (j = 1; j <= m; j++) if (!(k[j] in want)) { want[k[j]] = 1; q[++t] = k[j] } } }'); do
        f=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
        total=$(( total + $(awk '{print $12 + $13}' <<<"$f") ))
    done
    echo "$total"
}
pid() { cat "$RUN/$1.pid"; }
died() {  # died NAME FILE : if the HomeNet process NAME has exited, append why to FILE (and
          # stderr) and return 0. Not in a subshell ($(...) or a pipe): `wait` needs our child.
    local p st why
    [ -e "$RUN/$1.pid" ] || return 1
    p=$(cat "$RUN/$1.pid")
    alive "$p" && return 1
    wait "$p"; st=$?
    why=$(printf '%s (pid %s) exited with status %s%s at %s; last log lines: %s' "$1" "$p" "$st" \
        "$([ "$st" -gt 128 ] && echo " (signal $((st - 128)))")" "$(date +%T)" \
        "$(tail -3 "$LOG/$1.out" | tr '\n' '|')")
    echo "$why" >>"$2"
    echo "$why" >&2
    rm -f "$RUN/$1.pid"
    return 0
}
NODE_HELP=""
node_has_flag() {  # node_has_flag FLAG : does this `homenet node` accept FLAG?
    [ -n "$NODE_HELP" ] || NODE_HELP=$("$HN" node --help 2>/dev/null)
    grep -q -- "$1" <<<"$NODE_HELP"
}
start_node() {  # start_node NAME PORT : `homenet node` on 127.0.0.1:PORT
    local args=(--bind "$H" --port "$2" --allow 127.0.0.1/32 --no-mdns --log-level warning --state-dir "$BP/state")
    local cmd=("$HN" node)
    # Since 0089d64 direct ip:port targets need a signed request by default; the benchmark
    # measures the unauthenticated data plane (`HN/1 CONNECT ip:port`), as the brief defines it.
    node_has_flag --connect-auth && args+=(--connect-auth none)
    start_hn "$1" READY "${cmd[@]}" "${args[@]}"
}
start_listen() {  # start_listen NAME NODE_PORT TARGET_PORT LOCAL_PORT
    start_hn "$1" LISTENING "$HN" listen "hn://$H:$2/$H:$3" --bind "$H" --port "$4" --log-level warning
}

