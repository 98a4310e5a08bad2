#!/usr/bin/env bash
# Runs the image that build.sh made and checks what a user relies on:
#   - `pgtide --version` and `--help` run in it (a static binary: no loader, no libraries);
#   - `check-config` on a mounted file, with a read-only root filesystem;
#   - zero-config mode from DATABASE_URL with an upstream nobody listens on: pgtide runs as
#     uid 65532, /healthz answers 200 and /readyz 503, the log is JSON lines;
#   - SIGTERM (`podman stop`) makes it exit 0.
#
#   deploy/container/smoke.sh                       # image pgtide:latest
#   IMAGE=pgtide:0.1.0 deploy/container/smoke.sh
#
# PODMAN_RUN_OPTS is added to every `podman run`. On a machine without CAP_SYS_RESOURCE
# and with hybrid cgroups (this project's build machine), podman needs
#   PODMAN_RUN_OPTS="--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=4096:4096"
# (runc from Debian's package; crun refuses hybrid cgroups, and the default limits are
# above what such a machine may set).
set -euo pipefail
image="${IMAGE:-pgtide:latest}"
tool="${CONTAINER_TOOL:-podman}"
read -r -a opts <<< "${PODMAN_RUN_OPTS:-}"
name="pgtide-smoke-$$"
work="$(mktemp -d)"
cleanup() { "$tool" rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "smoke: FAIL: $*" >&2; "$tool" logs "$name" >&2 2>&1 || true; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "==> --version, --help"
v="$("$tool" run --rm "${opts[@]}" "$image" --version)"
echo "$v"
[[ "$v" == pgtide\ * ]] || fail "--version printed: $v"
"$tool" run --rm "${opts[@]}" "$image" --help | grep -q 'A PostgreSQL connection pooler' || fail "--help"

echo "==> check-config on a mounted file, read-only root filesystem"
cat > "$work/pooler.toml" <<'TOML'
[pgtide]
listen = "0.0.0.0:6432"
metrics_listen = "0.0.0.0:9930"

[databases.app]
host = "db.internal"

[users.app]
password = "secret"
TOML
chmod 644 "$work/pooler.toml"
"$tool" run --rm "${opts[@]}" --read-only -v "$work/pooler.toml:/etc/pgtide/pooler.toml:ro" \
    "$image" check-config /etc/pgtide/pooler.toml

echo "==> zero-config (DATABASE_URL) with an unreachable upstream"
upstream_port="$(free_port)"; listen_port="$(free_port)"; metrics_port="$(free_port)"
"$tool" run -d --name "$name" "${opts[@]}" --read-only --network host \
    -e "DATABASE_URL=postgres://app:secret@127.0.0.1:$upstream_port/app" \
    "$image" --listen "127.0.0.1:$listen_port" --metrics-listen "127.0.0.1:$metrics_port" >/dev/null
for _ in $(seq 50); do
    curl -fs -o /dev/null "http://127.0.0.1:$metrics_port/healthz" && break
    sleep 0.1
done
health="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$metrics_port/healthz")"
ready="$(curl -s -o "$work/readyz" -w '%{http_code}' "http://127.0.0.1:$metrics_port/readyz")"
echo "/healthz $health, /readyz $ready: $(cat "$work/readyz")"
[ "$health" = 200 ] || fail "/healthz answered $health"
[ "$ready" = 503 ] || fail "/readyz answered $ready with no reachable upstream"
user="$("$tool" top "$name" huser | tail -n 1 | tr -d ' ')"
echo "runs as uid $user"
[ "$user" = 65532 ] || fail "runs as $user, not 65532"

echo "==> SIGTERM"
"$tool" stop -t 30 "$name" >/dev/null
code="$("$tool" inspect "$name" --format '{{.State.ExitCode}}')"
# The container's stdout only: the log goes there (--log-output stdout).
"$tool" logs "$name" > "$work/log" 2>/dev/null
python3 - "$work/log" <<'PY' || fail "the log is not JSON lines on stdout"
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
msgs = [json.loads(l)["fields"]["message"] for l in lines]
assert any("signal received" in m for m in msgs), msgs
print(f"{len(lines)} JSON log lines, the last: {msgs[-1]!r}")
PY
[ "$code" = 0 ] || fail "exit status $code after SIGTERM"
echo "exit status 0"
echo "smoke: OK ($image)"
