#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
#
# Run as root: the end-to-end tests create two system users (sbx-e2e-daemon, sbx-e2e-rootless),
# start the privileged helper, and check sandboxes from the host side. SANDBOXD_E2E_REQUIRE=1
# makes them fail, instead of skipping, when they cannot run.
set -euo pipefail
cd "$(dirname "$0")/.."

export SANDBOXD_E2E_REQUIRE=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== openapi.yaml is valid OpenAPI (openapi-spec-validator)"
# Pinned; on Debian's own python3 pip refuses system-wide installs unless told to.
osv="openapi-spec-validator==0.7.1"
pip_install() { python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }
if ! out="$(pip_install "$osv" 2>&1)"; then
    grep -q externally-managed-environment <<<"$out" || { echo "$out" >&2; exit 1; }
    pip_install --break-system-packages "$osv"
fi
python3 -m openapi_spec_validator openapi.yaml

# --- issue 17: the contract proven by outside tools (schemathesis, openapi-python-client) ---
# Installed (pinned, tests/contract/requirements.txt) into a virtual environment of their own;
# the e2e tests in tests/tests/e2e/contract.rs run them against a real daemon and fail the run
# on any finding (they fail, not skip, under SANDBOXD_E2E_REQUIRE=1 without these tools).
echo "== contract tools (schemathesis, openapi-python-client) into target/contract-tools"
tools="$PWD/target/contract-tools"
if ! "$tools/bin/python" -c 'import sys' 2>/dev/null; then
    if ! python3 -m venv "$tools" 2>/dev/null; then
        # Debian's python3 keeps venv in a package of its own.
        rm -rf "$tools"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        python3 -m venv "$tools"
    fi
fi
"$tools/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/contract/requirements.txt
export SANDBOXD_CONTRACT_TOOLS="$tools/bin"
# --- end of issue 17's block ---
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test (unit, API, and end-to-end tests with the real binaries)"
cargo build --workspace --bins --locked
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the last often 0 doc tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
# This host boots cgroup v1 hybrid; most users run pure v2: the cgroup, limits and rootless
# tests again in a VM booted with cgroup_no_v1=all (boot about 17 s; the whole job 1.5 min on a
# quiet machine, 5 min on a loaded one).
echo "== pure cgroup v2 in a VM (tests/vm/cgroup-v2.sh)"
vm_status=0
./tests/vm/cgroup-v2.sh || vm_status=$?
[ "$status" = 0 ] || exit "$status"
exit "$vm_status"
