#!/usr/bin/env bash
# Builds pgtide's container image without pulling anything from a registry:
#  1. the release binary (`--profile dist`), statically linked, on the host;
#  2. `podman build -f Containerfile .`, an image `FROM scratch` holding that binary,
#     /etc/passwd and /etc/group for its non-root user (65532) and the host's CA bundle.
#
#   deploy/container/build.sh                 # tags pgtide:VERSION and pgtide:latest
#   IMAGE=registry.example/pgtide deploy/container/build.sh
#   deploy/container/smoke.sh                 # runs the image: --version, probes, SIGTERM
#
# Environment: IMAGE (default pgtide), CARGO_TARGET_DIR (cargo's own), CONTAINER_TOOL
# (default podman; only podman was tried), TARGET (default x86_64-unknown-linux-gnu).
#
# Why static glibc and not musl: the x86_64-unknown-linux-musl standard library comes
# from `rustup target add`, which downloads it; where that is possible,
#   RUSTFLAGS= cargo build --profile dist --target x86_64-unknown-linux-musl
# should give the same kind of binary for this Containerfile
# (TARGET=x86_64-unknown-linux-musl; not tried: the target cannot be installed here).
# With glibc's crt-static, name resolution (getaddrinfo) still works: glibc >= 2.34 has
# the `files` and `dns` NSS modules built in, which is all a container uses
# (/etc/hosts and /etc/resolv.conf, mounted by the runtime).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

image="${IMAGE:-pgtide}"
tool="${CONTAINER_TOOL:-podman}"
target="${TARGET:-x86_64-unknown-linux-gnu}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"

echo "==> cargo build --profile dist --target $target (static)"
# --target keeps RUSTFLAGS off build scripts and proc macros (which cannot be static).
if [ "$target" = x86_64-unknown-linux-gnu ]; then
    export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static"
fi
cargo build --profile dist --locked --target "$target" --bin pgtide
bin="$target_dir/$target/dist/pgtide"

# The image has no loader and no shared library: refuse a dynamically linked binary.
if readelf -lW "$bin" | grep -q 'Requesting program interpreter' || readelf -dW "$bin" | grep -q '(NEEDED)'; then
    echo "build.sh: $bin is dynamically linked; the FROM scratch image cannot run it" >&2
    readelf -dW "$bin" | grep '(NEEDED)' >&2 || true
    exit 1
fi

echo "==> staging target/container/rootfs"
rootfs="$root/target/container/rootfs"
rm -rf "$rootfs"
install -D -m 755 "$bin" "$rootfs/usr/local/bin/pgtide"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    install -D -m 644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
else
    echo "(no /etc/ssl/certs/ca-certificates.crt on this machine: the image has no CA bundle)"
fi
"$rootfs/usr/local/bin/pgtide" --version

echo "==> $tool build -t $image:$version"
"$tool" build -f Containerfile -t "$image:$version" -t "$image:latest" .
"$tool" image ls "$image"
