#!/usr/bin/env bash
# Installs what pgtide's demo, tests and benchmark need when it is missing:
# PostgreSQL server binaries, psql, pgbench and PgBouncer (Debian/Ubuntu packages).
# Does nothing when everything is there already.
set -euo pipefail

missing=()
have_server_bins() {
    local d
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then return 0; fi
    for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && return 0; done
    command -v initdb >/dev/null 2>&1
}
have_server_bins || missing+=(postgresql postgresql-contrib)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || missing+=(postgresql-contrib)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
[ "${#missing[@]}" -eq 0 ] && exit 0

echo "==> installing: ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    else
        echo "pgtide needs these packages: ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
