#!/usr/bin/env bash
# cargo-deny over Cargo.lock with deny.toml: licenses (permissive only), duplicate crates (each
# listed with its reason, a new one fails), wildcard versions and sources (crates.io only) must
# pass. Security advisories are checked too wherever the RustSec database can be fetched
# (github.com); a machine that reaches only the package registries says so and goes on, since
# the database is published nowhere else. Installs cargo-deny from crates.io when missing.
# Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q "$DENY_VERSION"; then
  echo "installing cargo-deny $DENY_VERSION from crates.io"
  cargo install --quiet --locked --no-default-features "cargo-deny@$DENY_VERSION"
fi

cargo deny --log-level error check bans licenses sources && echo

if cargo deny --log-level error check advisories 2>/tmp/kvmesh-deny-advisories.log; then
  echo "advisories ok"
elif grep -q "failed to fetch advisory database" /tmp/kvmesh-deny-advisories.log; then
  echo "advisories NOT checked: the RustSec database (github.com/RustSec/advisory-db) is unreachable from here" >&2
else
  cat /tmp/kvmesh-deny-advisories.log >&2
  exit 1
fi
