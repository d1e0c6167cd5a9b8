#!/usr/bin/env bash
# Build sandboxd, start the daemon in the background on the embedded defaults (SQLite, the host's
# read-only root filesystem) and run a first sandbox. Works as root (privileged helper, the daemon
# itself drops to the `sandboxd` user, created here if missing) and as an ordinary user (rootless).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins --locked
bin="$PWD/target/release"

if [ "$(id -u)" = 0 ]; then
    id sandboxd >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin sandboxd
    state_dir=/var/lib/sandboxd
    user_args=(--user sandboxd)
else
    state_dir="${XDG_STATE_HOME:-$HOME/.local/state}/sandboxd"
    user_args=()
fi

if ! curl -fsS http://127.0.0.1:4280/healthz >/dev/null 2>&1; then
    log="${TMPDIR:-/tmp}/sandboxd-quickstart.log"
    nohup "$bin/sandboxd" --state-dir "$state_dir" "${user_args[@]}" >"$log" 2>&1 &
    echo "sandboxd started (pid $!, log $log)"
    for _ in $(seq 1 100); do
        curl -fsS http://127.0.0.1:4280/healthz >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

"$bin/sbx" run -- sh -c 'echo "hello from $(hostname), uid $(id -u) inside"; cat /proc/self/uid_map'
