#!/usr/bin/env bash
# Validates deploy/kubernetes offline:
#  1. every manifest against the Kubernetes OpenAPI schemas bundled in the PyPI package
#     kubernetes-validate (strict: unknown fields are errors), for each pinned version;
#  2. check.py: the manifests agree with each other and with the ConfigMap's pooler.toml
#     (selectors, ports, probes, grace period vs shutdown_delay + shutdown_timeout,
#     non-root, read-only root); with PGTIDE_BIN, `pgtide check-config` on it too.
#
#   deploy/kubernetes/validate.sh
#   PGTIDE_BIN=target/debug/pgtide deploy/kubernetes/validate.sh
#
# The venv lives outside the repository (VENV, default ~/.cache/pgtide/kubernetes-validate)
# and is made once from requirements.txt (pinned); PyPI is needed only for that.
set -euo pipefail
# Absolute, as given from the caller's directory (the checks below run elsewhere).
bin="${PGTIDE_BIN:+$(realpath -e "$PGTIDE_BIN")}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
versions="${K8S_VERSIONS:-1.30.0 1.37.0}"
venv="${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pgtide/kubernetes-validate}"
stamp="$venv/.requirements.txt"

if ! cmp -s "$here/requirements.txt" "$stamp" 2>/dev/null; then
    echo "==> venv $venv ($(grep -m1 '^kubernetes-validate' "$here/requirements.txt"))"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$here/requirements.txt"
    "$venv/bin/pip" check
    cp "$here/requirements.txt" "$stamp"
fi

mapfile -t manifests < <(cd "$here" && find . -name '*.yaml' | sed 's|^\./||' | sort)
[ "${#manifests[@]}" -gt 0 ] || { echo "validate.sh: no manifests in $here" >&2; exit 1; }
cd "$here"
for v in $versions; do
    echo "==> schemas of Kubernetes $v (strict), ${#manifests[@]} files"
    "$venv/bin/kubernetes-validate" --strict --kubernetes-version "$v" "${manifests[@]}"
done

echo "==> consistency (check.py)"
"$venv/bin/python" "$here/check.py" "$here" ${bin:+"$bin"}
