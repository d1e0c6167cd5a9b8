#!/usr/bin/env bash
# Inside the VM of cgroup-v2.sh: check that the host is pure cgroup v2, load the modules sandboxd
# uses, and run the e2e test binary with the given filters. Writes OUT/log and OUT/rc.
# Usage: guest.sh OUT REPO TESTBIN FILTER...
out="$1" repo="$2" testbin="$3"
shift 3
exec >"$out/log" 2>&1
run() {
    set -euo pipefail
    echo "guest: $(uname -r), $(nproc) cpus"
    grep -q ' - cgroup2 ' /proc/self/mountinfo || { echo "no cgroup2 mount"; return 1; }
    if grep -q ' - cgroup ' /proc/self/mountinfo; then echo "a cgroup v1 hierarchy is mounted"; return 1; fi
    echo "cgroup.controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
    for m in overlay veth bridge loop; do modprobe "$m"; done
    for m in nf_tables nft_chain_nat nf_nat tun; do modprobe "$m" 2>/dev/null || true; done
    # A fresh tmpfs for state directories (the root is the host's, read-only, under overlays).
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    # The daemons run as unprivileged users: binaries where they may execute them.
    mkdir -p /tmp/sbx-bin
    for bin in sandboxd sandboxd-helper sbx; do install -m 0755 "$repo/target/debug/$bin" /tmp/sbx-bin/; done
    cd "$repo/tests"
    SANDBOXD_E2E_REQUIRE=1 SANDBOXD_E2E_CGROUP_V2=1 SANDBOXD_E2E_BINARIES=/tmp/sbx-bin \
        "$testbin" --test-threads=2 "$@"
}
( run "$@" )
echo $? >"$out/rc"
