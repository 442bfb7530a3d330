#!/usr/bin/env bash
# Start the Docker engine Orbital's docker tests run against, and print its DOCKER_HOST.
#
# Idempotent: a second call finds the engine answering and only prints the host again.
# The engine is private to the tests: its own data-root, exec-root, pidfile, socket and
# bridge (orbbr0, 10.213.0.1/24). It never touches another daemon's docker0 (no
# --bridge=none) and adds no iptables rules (--iptables=false; published ports go through
# docker-proxy on the chosen address). Logs: /var/log/orbital-test-dockerd.log.
#
# Environment (all optional):
#   ORBITAL_TEST_DOCKER_ROOT   data-root         (default /var/lib/orbital-test-docker)
#   ORBITAL_TEST_DOCKER_SOCK   socket path       (default /run/orbital-test-docker.sock)
#   ORBITAL_TEST_DOCKER_WAIT_S seconds to wait   (default 60)
set -euo pipefail

data_root=${ORBITAL_TEST_DOCKER_ROOT:-/var/lib/orbital-test-docker}
sock=${ORBITAL_TEST_DOCKER_SOCK:-/run/orbital-test-docker.sock}
exec_root=/run/orbital-test-docker
pidfile=/run/orbital-test-docker.pid
log=/var/log/orbital-test-dockerd.log
bridge=orbbr0
bridge_cidr=10.213.0.1/24
wait_s=${ORBITAL_TEST_DOCKER_WAIT_S:-60}
host="unix://$sock"

# /usr/bin/docker is Debian's client, matching Debian's dockerd; another client on PATH may
# speak a newer API than this engine.
docker_cli=/usr/bin/docker
[ -x "$docker_cli" ] || docker_cli=$(command -v docker)

answering() {
    "$docker_cli" -H "$host" version --format '{{.Server.Version}}' >/dev/null 2>&1
}

if answering; then
    echo "$host"
    exit 0
fi

command -v dockerd >/dev/null || {
    echo "start-dockerd: dockerd not found; install Debian's docker.io (apt-get install -y docker.io)" >&2
    exit 1
}

if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
fi
if ! ip -4 addr show dev "$bridge" | grep -q "${bridge_cidr%/*}/"; then
    ip addr add "$bridge_cidr" dev "$bridge"
fi
ip link set "$bridge" up

# A dockerd that died leaves its pidfile; dockerd refuses to start while it names a live
# process, so only remove it when that process is gone.
if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    rm -f "$pidfile"
fi

if [ ! -f "$pidfile" ]; then
    mkdir -p "$data_root" "$exec_root"
    # setsid + nohup: the engine outlives this script and the shell that ran it.
    setsid nohup dockerd \
        --data-root "$data_root" \
        --exec-root "$exec_root" \
        --pidfile "$pidfile" \
        -H "$host" \
        --bridge="$bridge" \
        --iptables=false \
        --ip-masq=false \
        --storage-driver=overlay2 \
        >>"$log" 2>&1 </dev/null &
fi

deadline=$((SECONDS + wait_s))
until answering; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "start-dockerd: engine at $host did not answer within ${wait_s}s; last log lines:" >&2
        tail -n 30 "$log" >&2 || true
        exit 1
    fi
    sleep 0.5
done
echo "$host"
