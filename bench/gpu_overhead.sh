#!/usr/bin/env bash
# The guard's cost on a GPU: builds the client side of lossguard (client,
# LibTorch guard, lossguard-train; LOSSGUARD_CLIENT_ONLY) against PyTorch's
# own CUDA LibTorch, starts lossguardd, and runs bench/guard_overhead.py on
# CUDA: the training step time with no guard, with the guard attached to
# lossguardd, and with the guard embedded, for each model.
#
#   bench/gpu_overhead.sh [DEPS_DIR] [-- guard_overhead.py options]
#
# DEPS_DIR (from bench/gpu_pack_deps.sh, on a Debian 12 machine) is for GPU
# machines without gRPC's C++ development files: its Debian packages are
# unpacked under /tmp and used from there, its lossguardd and Fashion-MNIST
# too. Without it, everything comes from the system (Debian's packages) and
# build/bin/lossguardd.
# Environment: BUILD_DIR (default build-gpu), MODELS (default "cnn resnet"),
# STEPS (default 300), REPS (default 5), BATCH (default 64), DEVICE
# (default cuda). PY_BATCHES (e.g. "64 1024"): then bench/py_guard_overhead.py
# runs too, at those batch sizes, with PY_VARIANTS and the Python package in
# PY_PATH (default build/python, made by a full build; it is pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
deps=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then deps=$(cd "$1" && pwd); shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
build=${BUILD_DIR:-build-gpu}
python=${PYTHON:-python3}

torch_prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'

cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DLOSSGUARD_CLIENT_ONLY=ON
            -DLOSSGUARD_WERROR=OFF)
prefixes="$torch_prefix"
daemon=build/bin/lossguardd
data_args=()
daemon_env=()
if [ -n "$deps" ]; then
  p=/tmp/lossguard-deps
  if ! cmp -s "$deps/deps.tar.xz" "$p/.deps.tar.xz"; then
    rm -rf "$p" && mkdir -p "$p"
    tar -C "$p" -xJf "$deps/deps.tar.xz"
    cp "$deps/deps.tar.xz" "$p/.deps.tar.xz"
  fi
  lib="$p/usr/lib/x86_64-linux-gnu"
  # protoc and grpc_cpp_plugin find their libraries through a wrapper; the
  # rest of the build keeps the system's.
  cat >"$p/protoc" <<EOF
#!/bin/sh
LD_LIBRARY_PATH=$lib:$p/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $p/usr/bin/protoc "\$@"
EOF
  chmod +x "$p/protoc"
  prefixes="$prefixes;$p/usr"
  # gRPC's CMake config links re2 by name (-lre2, from its pkg-config file
  # with prefix /usr), hence the -L. The rpath keeps the unpacked libraries
  # found at run time, as DT_RPATH (--disable-new-dtags): unlike RUNPATH it
  # also serves their own dependencies (libgrpc++ -> libabsl_*).
  cmake_args+=("-DCMAKE_EXE_LINKER_FLAGS=-L$lib -Wl,--disable-new-dtags,-rpath,$lib")
  cmake_args+=(-DProtobuf_PROTOC_EXECUTABLE="$p/protoc"
               -DProtobuf_INCLUDE_DIR="$p/usr/include"
               -DProtobuf_LIBRARY="$lib/libprotobuf.so"
               -Dabsl_DIR="$lib/cmake/absl" -DgRPC_DIR="$lib/cmake/grpc"
               -Dnlohmann_json_DIR="$p/usr/share/cmake/nlohmann_json"
               -DEigen3_DIR="$p/usr/share/eigen3/cmake")
  daemon="$deps/lossguardd"
  daemon_env=(env "LD_LIBRARY_PATH=$lib:$p/lib/x86_64-linux-gnu")
  data_args=(--data_dir "$deps/fashion-mnist")
fi
# PyTorch's wheels may ship protobuf headers of their own version; the
# generated code must see the ones of the protobuf it links.
if [ -d "$torch_prefix/../../include/google/protobuf" ]; then
  echo "moving PyTorch's bundled protobuf headers aside"
  mv "$torch_prefix/../../include/google" "$torch_prefix/../../include/google.torch-bundled"
fi
cmake -S . -B "$build" "${cmake_args[@]}" -DCMAKE_PREFIX_PATH="$prefixes"
cmake --build "$build" --target lossguard-train
ldd "$build/bin/lossguard-train" | grep -E 'torch|grpc|protobuf|cuda' || true

"$python" bench/guard_overhead.py --bin "$build/bin" --daemon "${daemon_env[*]} $daemon" \
  --device "${DEVICE:-cuda}" --steps "${STEPS:-300}" --reps "${REPS:-5}" \
  --models "${MODELS:-cnn resnet}" --batch_size "${BATCH:-64}" "${data_args[@]}" "$@"

if [ -n "${PY_BATCHES:-}" ]; then
  py_data=/usr/share/datasets/fashion-mnist
  if [ -n "$deps" ]; then py_data="$deps/fashion-mnist"; fi
  "$python" bench/py_guard_overhead.py --device "${DEVICE:-cuda}" \
    --daemon "${daemon_env[*]} $daemon" --pythonpath "${PY_PATH:-build/python}" \
    --data_dir "$py_data" \
    --batch_sizes "$PY_BATCHES" --reps "${REPS:-5}" \
    --variants "${PY_VARIANTS:-no guard,attached,every step,no gradient norm}"
fi
