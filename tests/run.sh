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

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test (unit, API, and end-to-end tests with the real binaries)"
cargo build --workspace --bins --locked
cargo test --workspace --locked
