#!/usr/bin/env bash
# Create .venv and install ultraplan with everything the tests need. Idempotent.
# - torch: the CPU wheel (torch==2.13.0, found on local disk here) when no CUDA GPU is present,
#   so pip never pulls the multi-GB CUDA build; with a GPU, a regular torch.
# - graphviz's `dot` binary from Debian when it is missing and apt is usable.
# - --no-compile: pip byte-compiles nothing at install (torch alone has thousands of modules the tests never
#   import); Python compiles and caches each module on its first import instead. Measured: the set-up's
#   CPU 74 s -> 47 s, the first `import torch, sympy, triton, ...` ~1 s more than later ones.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    "${PIP[@]}" torch==2.13.0
  fi
fi
"${PIP[@]}" -e ".[dev,triton,refs,examples]"
if ! command -v dot >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing graphviz (the dot binary) with apt-get"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null
  else
    echo "warning: graphviz 'dot' is missing and apt-get is not usable; plans will be written as .dot only" >&2
  fi
fi
