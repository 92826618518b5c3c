#!/usr/bin/env bash
# llama.cpp beside routed, on a machine that reaches only the package registries: llama.cpp's sources come from
# PyPI (vendored in the llama-cpp-python sdist), llama-bench and llama-quantize are built with CMake, and the
# checkpoint is converted to GGUF by llama.cpp's own convert_hf_to_gguf.py (bf16), then quantized to Q8_0 and
# Q4_K_M. Timing is benchmarks/speed_small.py's job (--llama-bench, --gguf), in the same run as the rest.
#
#   benchmarks/llama_cpp.sh checkpoints/small /tmp/llama        # 9 min 46 s on 2 Zen 3 cores; needs cmake, g++
#   -> /tmp/llama/build/bin/llama-bench, /tmp/llama/small-{bf16,q8_0,q4_k_m}.gguf
#
# Run it from the environment routed's tests use (the converter needs torch, numpy, transformers).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CHECKPOINT_DIR OUT_DIR [LLAMA_CPP_PYTHON_VERSION]" >&2
  exit 2
fi
ckpt=$1
out=$2
version=${3:-0.3.36}  # llama.cpp of 2026-11
[ -f "$ckpt/config.json" ] || { echo "error: $ckpt has no config.json" >&2; exit 1; }
mkdir -p "$out/src"
src="$out/src/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -d "$src" ]; then
  pip download --quiet --no-deps --disable-pip-version-check --no-binary :all: "llama-cpp-python==$version" -d "$out/src"
  tar xzf "$out/src/llama_cpp_python-$version.tar.gz" -C "$out/src"
fi
cmake -S "$src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > "$out/cmake.log"
cmake --build "$out/build" --target llama-bench llama-quantize -j"$(nproc)" > "$out/build.log"
name=$(basename "$(realpath "$ckpt")")
python "$src/convert_hf_to_gguf.py" "$ckpt" --outtype bf16 --outfile "$out/$name-bf16.gguf"
"$out/build/bin/llama-quantize" "$out/$name-bf16.gguf" "$out/$name-q8_0.gguf" Q8_0 > "$out/quantize.log" 2>&1
"$out/build/bin/llama-quantize" "$out/$name-bf16.gguf" "$out/$name-q4_k_m.gguf" Q4_K_M >> "$out/quantize.log" 2>&1
ls -l "$out/build/bin/llama-bench" "$out/$name"-*.gguf
