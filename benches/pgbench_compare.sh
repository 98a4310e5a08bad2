#!/usr/bin/env bash
# pgbench through pgtide, PgBouncer and PostgreSQL directly, in one interleaved run.
# A thin wrapper: the work is in pgbench_compare.py (python3, standard library only).
# Usage: [SMOKE=1] [CLIENTS="10 50 200"] [DURATION=10] [ROUNDS=1] ... bash benches/pgbench_compare.sh [--write-readme]
# See benches/README.md for every knob.
set -euo pipefail
exec python3 "$(dirname "$0")/pgbench_compare.py" "$@"
