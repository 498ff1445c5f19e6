#!/usr/bin/env bash
# Packs what a GPU machine without gRPC's C++ development files needs to
# build the client side of lossguard against PyTorch's own LibTorch and to
# run lossguardd beside it, all from Debian 12 packages:
#
#   bench/gpu_pack_deps.sh OUTDIR
#
# writes OUTDIR/deps.tar.xz (the packages below unpacked with dpkg -x, no
# static libraries or docs), OUTDIR/lossguardd (this build's daemon,
# stripped; it runs with the libraries in deps.tar.xz) and OUTDIR/fashion-mnist/
# (Debian's dataset-fashion-mnist). bench/gpu_overhead.sh takes OUTDIR.
# Run it after a normal build (build/bin/lossguardd).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_pack_deps.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

packages=(
  libgrpc++-dev libgrpc-dev libgrpc++1.51 libgrpc29
  libprotobuf-dev libprotobuf32 libprotoc32 libprotobuf-lite32
  protobuf-compiler protobuf-compiler-grpc
  libabsl-dev libabsl20220623 libre2-9 libre2-dev libc-ares2 libc-ares-dev
  libssl-dev libssl3 zlib1g-dev zlib1g libbrotli1
  libeigen3-dev nlohmann-json3-dev
  libsqlite3-0 libcpp-httplib0.11
)
# And every package whose libraries this build's lossguardd loads (libpq5
# for the PostgreSQL store and what it pulls in, ...), except the C and
# C++ runtimes: the GPU host's own are newer.
for lib in $(ldd build/bin/lossguardd | awk '/=>/ {print $3}'); do
  pkg=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "${lib#/usr}" 2>/dev/null ||
        dpkg -S "/usr$lib" 2>/dev/null || true)
  pkg=${pkg%%:*}
  case "$pkg" in ""|libc6|libgcc-s1|libstdc++6) ;; *) packages+=("$pkg") ;; esac
done
mapfile -t packages < <(printf '%s\n' "${packages[@]}" | sort -u)
(cd "$work" && apt-get download "${packages[@]}" >/dev/null)
mkdir "$work/root"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done
root="$work/root"
find "$root" -name '*.a' -delete
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/lintian" \
  "$root/usr/include/eigen3/unsupported"
# Absolute links (zlib's libz.so -> /lib/...) would point outside the tree
# once unpacked elsewhere.
find "$root" -type l -lname '/*' | while read -r link; do
  target=$(readlink "$link")
  ln -sfn "$(realpath --relative-to="$(dirname "$link")" "$root$target")" "$link"
done
tar -C "$root" -cJf "$out/deps.tar.xz" .
cp build/bin/lossguardd "$out/lossguardd"
strip "$out/lossguardd"
mkdir -p "$out/fashion-mnist"
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$out/fashion-mnist/"
du -sh "$out"/*
