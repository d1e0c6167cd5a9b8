#!/usr/bin/env bash
# The pure cgroup v2 job: boot a Debian kernel with `cgroup_no_v1=all` in QEMU (TCG: no KVM
# needed) over this machine's own filesystem (virtme-ng), and run the cgroup end-to-end tests in
# it against the test binary and daemon binaries already built here: privileged mode at the root
# of the unified hierarchy (CLONE_INTO_CGROUP), and rootless in a delegated subtree.
#
# Run as root on Debian 12 after `cargo build --workspace --bins` (tests/run.sh calls it). It
# installs what it needs: qemu-system-x86, kmod, busybox-static, a linux-image package (unpacked,
# not installed) and virtme-ng. SANDBOXD_VM_CACHE (default target/vm) keeps the kernel between
# runs; it must be a directory the guest sees as the host has it, so not below /tmp, /run,
# /var/cache or /var/tmp (virtme-ng mounts tmpfs there in the guest). Fails, never skips: a VM that does not boot or a test that does not pass
# is a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$(pwd)"
cache="${SANDBOXD_VM_CACHE:-$repo/target/vm}"
for dir in "$repo" "$cache"; do
    case "$dir/" in
        /tmp/* | /run/* | /var/cache/* | /var/tmp/*)
            echo "the VM job cannot run from $dir: virtme-ng hides /tmp, /run, /var/cache and" \
                "/var/tmp from the guest; use a checkout (and SANDBOXD_VM_CACHE) elsewhere" >&2
            exit 1
            ;;
    esac
done
# The tests that need the unified hierarchy, and the limits, OOM and stats tests of both modes.
# Skipped in the VM: what does not touch cgroups (output cap, TTL, the daemon's maximums), and
# the CPU share measurement, which compares cgroup CPU time with wall-clock time and is not
# meaningful in an emulated machine that the host deschedules (cpu.max itself is checked by
# cgroup_v2::).
filters=(cgroup_v2:: limits:: rootless::
    --skip limits::a_busy_loop_gets_about_its_cpu_share
    --skip limits::output_past_the_cap
    --skip limits::ttl_kills
    --skip limits::a_request_above_the_daemons_maximum)

echo "== VM: packages (qemu-system-x86, kmod, busybox-static, virtme-ng)"
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v modprobe >/dev/null || need+=(kmod)
command -v busybox >/dev/null || need+=(busybox-static)
if ((${#need[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi
vng_pkg="virtme-ng==1.42"
if ! command -v vng >/dev/null; then
    pip_install() { python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }
    if ! out="$(pip_install "$vng_pkg" 2>&1)"; then
        grep -q externally-managed-environment <<<"$out" || { echo "$out" >&2; exit 1; }
        pip_install --break-system-packages "$vng_pkg"
    fi
    hash -r
fi

echo "== VM: kernel"
# Debian's current kernel (the one linux-image-amd64 depends on), unpacked with its modules
# (overlay, veth, bridge, loop), which virtme-ng loads from the unpacked tree.
kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
[ -n "$kpkg" ] || { apt-get update >/dev/null; kpkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"; }
[ -n "$kpkg" ] || { echo "no linux-image package found" >&2; exit 1; }
kver="${kpkg#linux-image-}"
kroot="$cache/$kver"
if [ ! -f "$kroot/boot/vmlinuz-$kver" ]; then
    mkdir -p "$cache"
    tmp="$(mktemp -d "$cache/dl.XXXXXX")"
    (cd "$tmp" && apt-get download "$kpkg" 2>/dev/null >/dev/null)
    dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/root"
    rm -rf "$kroot"
    mv "$tmp/root" "$kroot"
    rm -rf "$tmp"
fi
echo "kernel $kver"

echo "== VM: test binary"
testbin="$(cargo test -p sandboxd-tests --test e2e --no-run --locked --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "e2e":
        print(m["executable"])')"
[ -x "$testbin" ] || { echo "no e2e test binary found" >&2; exit 1; }
for bin in sandboxd sandboxd-helper sbx; do
    [ -x "target/debug/$bin" ] || { echo "target/debug/$bin is not built" >&2; exit 1; }
done

# Shared with the guest (--rwdir), so beside the kernel, for the reason above.
mkdir -p "$cache"
out="$(mktemp -d "$cache/run.XXXXXX")"
trap 'rm -rf "$out"' EXIT
echo "== VM: boot with cgroup_no_v1=all and run: ${filters[*]}"
started=$SECONDS
# virtme-ng's script console needs virtio_console, which Debian builds as a module that its
# initramfs does not load: the guest writes its log and exit status to a shared directory.
timeout 1500 vng --disable-kvm -m 3G -p 2 -r "$kroot/boot/vmlinuz-$kver" \
    --append 'cgroup_no_v1=all' --rwdir "$out" \
    -- bash "$repo/tests/vm/guest.sh" "$out" "$repo" "$testbin" "${filters[@]}" >/dev/null 2>&1 || true
cat "$out/log" 2>/dev/null || true
echo "VM run took $((SECONDS - started)) s"
[ -f "$out/rc" ] || { echo "the VM did not finish (no exit status)" >&2; exit 1; }
rc="$(cat "$out/rc")"
[ "$rc" = 0 ] || { echo "VM tests failed (exit $rc)" >&2; exit 1; }
