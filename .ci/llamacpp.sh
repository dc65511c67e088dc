#!/usr/bin/env bash
# llama-cpp-python, built from its sdist for the CPU (the registry has no wheels), and
# the gguf package; then the tests against a real llama.cpp with CI=true, so a missing
# llama_cpp fails them instead of skipping them. Run from .ci/run inside its virtualenv.
# The build takes about 4 minutes on 2 cores (ccache or a wheel cache make reruns fast).
set -euo pipefail
cd "$(dirname "$0")/.."

export CI=true
# Portable code (no -march=native: a wheel cached on one runner may run on another), and
# none of llama.cpp's tests, examples, tools or llava (llama_cpp imports mtmd only for
# multimodal chat handlers): only the libraries the binding loads.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

start=$(date +%s)
python -m pip install -q --no-binary llama-cpp-python "llama-cpp-python==0.3.36" "gguf==0.19.0"
echo "llama-cpp-python built and installed in $(($(date +%s) - start)) s"

status=0
python -m pytest -p no:cacheprovider tests/test_llamacpp_real.py tests/test_llamacpp.py || status=$?
if [ "$status" = 5 ]; then
    echo "tests/test_llamacpp_real.py collected no tests: the llama.cpp step ran nothing" >&2
    exit 1
fi
exit "$status"
