#!/usr/bin/env bash
# What `hardware=cuda` does on a real GPU, in one go, then one table of what the runs logged.
#
#   scripts/gpu_check.sh               # everything under ./gpu_check
#   WORK=/scratch/gc scripts/gpu_check.sh
#
# Needs the README's GPU install in the active environment (a CUDA build of torch, then
# `pip install -e '.[dev]'`); installs nothing. Runs, into its own MLflow store $WORK/mlflow.db and
# checkpoint cache $WORK/cache (so the fine-tune is timed on this GPU, not a CPU cache hit):
#   1. the GPU-marked tests (python -m pytest -q -m gpu);
#   2. the paper study on the offline default, one seed (24 jobs, profile off as in the study);
#   3. one profiled job (W8A8 paper, same fine-tune): engine vs PyTorch FP32 / FP16 on the GPU;
#   4. bench_base at BERT-base size with device=cuda;
# and prints the table of transquant.deploy.gpu_check: fine-tune minutes, median job seconds, p50
# latency per candidate, the GPU and the ONNX Runtime execution providers. A rerun reuses finished
# jobs (resume=true) and reprints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-gpu_check}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: this needs a machine with an NVIDIA GPU and its driver" >&2
    exit 1
fi
nvidia-smi -L
if ! python -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "gpu_check: torch $(python -c 'import torch; print(torch.__version__)') sees no CUDA GPU;" \
         "install a CUDA build as the README says (GPU users) and activate that environment" >&2
    exit 1
fi

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
STORE=(tracking.uri="sqlite:///$WORK/mlflow.db" paths.cache_dir="$WORK/cache")
CUDA=(train.seed=1000 hardware=cuda)

echo "== 1/4 GPU tests"
python -m pytest -q -m gpu

echo "== 2/4 paper study, one seed, hardware=cuda"
python -m transquant.run -m +experiment=paper "${CUDA[@]}" "${STORE[@]}" \
    hydra.sweep.dir="$WORK/multirun"

echo "== 3/4 one profiled job (the study's fine-tune)"
python -m transquant.run quant=w8a8_paper train=bondarenko calibration=paper "${CUDA[@]}" "${STORE[@]}" \
    tracking.experiment=gpu_profile hydra.run.dir="$WORK/outputs"

echo "== 4/4 bench_base on the GPU"
python -m transquant.bench_base device=cuda "methods=[w8a8_paper,mixed_paper]" out="$WORK/bench_base.csv"

echo "== summary"
python -m transquant.deploy.gpu_check tracking.uri="sqlite:///$WORK/mlflow.db" bench="$WORK/bench_base.csv"
