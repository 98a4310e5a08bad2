#!/usr/bin/env bash
# Installs what pgtide's demo, tests and benchmark need when it is missing:
# PostgreSQL server binaries, psql, pgbench and PgBouncer (Debian/Ubuntu packages), and
# the client drivers of the driver-matrix tests (integration/drivers.rs): a Python venv
# at .venv-drivers/ with psycopg 3 and asyncpg, node-postgres in integration/drivers/
# node_modules, and pgjdbc (libpostgresql-jdbc-java) with a JDK.
# Does nothing, and prints nothing, when everything is there already.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

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
# promtool (from the prometheus package) checks the /metrics exposition in the tests.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# deploy/systemd/verify.sh checks the unit file with systemd-analyze (no running systemd needed).
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# Driver matrix: pgjdbc and a JDK to compile its test program.
[ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
# Driver matrix: python3 with venv, node with npm.
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ ! -x "$root/.venv-drivers/bin/python" ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)

if [ "${#missing[@]}" -gt 0 ]; then
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
fi

# Python drivers: a venv of our own, so the system Python is left alone.
venv="$root/.venv-drivers"
if ! "$venv/bin/python" -c 'import psycopg, asyncpg; assert psycopg.__version__.startswith("3.")' >/dev/null 2>&1; then
    echo "==> creating $venv with psycopg[binary] 3 and asyncpg"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        'psycopg[binary]>=3.1,<4' 'asyncpg>=0.29'
fi

# node-postgres.
drivers="$root/integration/drivers"
if [ ! -f "$drivers/node_modules/pg/package.json" ]; then
    echo "==> installing node-postgres in $drivers"
    if [ -f "$drivers/package-lock.json" ]; then
        (cd "$drivers" && npm ci --no-audit --no-fund --loglevel=error)
    else
        (cd "$drivers" && npm install --no-audit --no-fund --loglevel=error)
    fi
fi
