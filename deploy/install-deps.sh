#!/usr/bin/env bash
# Installs every build, test and runtime dependency of lossguard from Debian 12
# packages. Idempotent: packages already present are left as they are.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libeigen3-dev
  libabsl-dev
  libprotobuf-dev protobuf-compiler
  libgrpc++-dev grpc-proto protobuf-compiler-grpc
  libgtest-dev libgmock-dev
  libbenchmark-dev
  nlohmann-json3-dev
  libcsv-dev
  libsqlite3-dev
  libpq-dev postgresql
  libssl-dev openssl
  clang libclang-rt-14-dev
  libtorch-dev
  dataset-fashion-mnist
  python3 python3-numpy python3-torch python3-grpcio python3-protobuf
  python3-pip python3-setuptools python3-wheel python3-venv
  python3-yaml python3-kubernetes systemd
  libcpp-httplib-dev
  chromium
)
# The dashboard's front end is built with npm (its packages come from the
# npm registry, pinned by server/dashboard/package-lock.json). A machine
# with Node.js and npm already (from NodeSource, say) keeps them; otherwise
# Debian's.
if ! command -v npm >/dev/null 2>&1; then
  packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
