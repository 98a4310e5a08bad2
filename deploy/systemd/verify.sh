#!/usr/bin/env bash
# Checks deploy/systemd/pgtide.service without a running systemd:
#  - `systemd-analyze verify`: every directive is known and parses, the commands exist
#    (it prints warnings and still exits 0, so any output is a failure here);
#  - `systemd-analyze security --offline=yes`: the hardening's exposure score is at most
#    2.0 (out of 10; lower is better).
# verify needs /usr/local/bin/pgtide: when it is not there, the script (as root) puts
# PGTIDE_BIN there inside a private mount namespace, seen by nothing else.
#
#   PGTIDE_BIN=target/debug/pgtide deploy/systemd/verify.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
unit="$here/pgtide.service"
command -v systemd-analyze >/dev/null || { echo "verify.sh: systemd-analyze not found (apt-get install systemd)" >&2; exit 1; }

echo "==> systemd-analyze verify pgtide.service"
if [ -x /usr/local/bin/pgtide ]; then
    out="$(systemd-analyze verify "$unit" 2>&1)" || { echo "$out"; exit 1; }
else
    bin="$(realpath "${PGTIDE_BIN:?PGTIDE_BIN: a pgtide binary, as /usr/local/bin/pgtide is not there}")"
    [ "$(id -u)" -eq 0 ] || { echo "verify.sh: needs root for the private mount of /usr/local/bin" >&2; exit 1; }
    out="$(BIN="$bin" UNIT="$unit" unshare --mount --propagation private sh -c \
        'mount -t tmpfs tmpfs /usr/local/bin && cp "$BIN" /usr/local/bin/pgtide && systemd-analyze verify "$UNIT"' 2>&1)" \
        || { echo "$out"; exit 1; }
fi
if [ -n "$out" ]; then
    echo "$out"
    echo "verify.sh: systemd-analyze verify complained about pgtide.service" >&2
    exit 1
fi
echo "no complaints"

echo "==> systemd-analyze security --offline=yes pgtide.service"
systemd-analyze security --offline=yes --threshold=20 --no-pager "$unit" | tail -n 1
