#!/usr/bin/env bash
# The test command (README): everything the test suites need, then every suite.
# Postgres: tests create and drop their own databases on DATABASE_URL (or
# COCHAT_TEST_POSTGRES_URL), default postgres://postgres@127.0.0.1:5432/postgres. Without a
# reachable Postgres the Postgres halves are skipped and named (SKIPPED lines) -- except with
# CI=true, where a missing Postgres fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

if ! command -v cargo >/dev/null; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi

if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    if [ "${CI:-}" = "true" ]; then
        echo "CI: PostgreSQL is not reachable on 127.0.0.1:5432; trying to start it" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    else
        echo "NOTE: no PostgreSQL on 127.0.0.1:5432: the Postgres halves of the suites will be SKIPPED" >&2
    fi
fi

echo "== deploy/ and k8s/ checks"
bash scripts/validate-deploy.sh

echo "== cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# --no-fail-fast: every suite runs and reports, even after one fails.
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
skipped="$(grep -c '^SKIPPED' "$log" || true)"
if [ "$skipped" != "0" ]; then
    echo "== $skipped test(s) SKIPPED (PostgreSQL or Redis not reachable):"
    grep '^SKIPPED' "$log" | sort | uniq
fi

# One closing line for the whole run (cargo's own last line is the doc-tests of the last crate).
passed="$(grep -E '^test result:' "$log" | awk '{s += $4} END {print s + 0}')"
failed="$(grep -E '^test result:' "$log" | awk '{s += $6} END {print s + 0}')"
echo "tests: $passed passed, $failed failed"
