#!/usr/bin/env bash
# GPU check of "training at scale" (issue 11): one call on a GPU machine without network, < 8 minutes on one H200.
#
#   scripts/gpu_check.sh --fetch     here, with network, once: downloads what the GPU machine lacks into gpu_wheels/
#                                    (gitignored; about 19 MB): nnunetv2 2.8.1 and the dependencies that machine's
#                                    image does not have (Python 3.12 manylinux wheels), the mamba-ssm sdist
#   scripts/gpu_check.sh             there (PYTHON=python3 with a CUDA torch and nvcc; OUT=results folder):
#                                    1. installs gpu_wheels/*.whl into $DSM_SITE (no index, no deps)
#                                    2. builds mamba-ssm's selective scan for the local GPU only
#                                       (python -m nnunetv2_dsm.benchmark.mamba_build, ~2-3 min on 16 cores)
#                                    3. python -m nnunetv2_dsm.benchmark.gpu_check: (a) kernels = PyTorch scan,
#                                       (b) a Stage 2 train_step with autocast + GradScaler at 80×160×160, batch 2,
#                                       (c) step time and memory vs nnUNetTrainer, kernels and PyTorch scan,
#                                       (d) sliding-window prediction of a 300×512×512 CT vs nnU-Net,
#                                       (e) nnUNet_compile=1: Stage 2 under torch.compile, no recompiling
#   scripts/gpu_check.sh --dry-run   any CPU machine, in the project's venv: the same steps at toy sizes, no build
#   GPU_CHECK_ONLY="compile bench_torch" scripts/gpu_check.sh   those sections only (no kernel build unless
#                                    kernels, train_step or bench_kernel is named); GPU_CHECK_SECONDS: the time
#
# Results in $OUT: gpu_check.md / gpu_check.json (all figures and the issue's targets), build.log, run.log,
# kernel/benchmark.{md,json}, torch/benchmark.{md,json}. SimpleITK (53 MB) is not carried: if it does not import,
# a stand-in module lets nnU-Net import (the check reads no image file); nvcc comes from the machine (the
# nvidia-cuda-nvcc wheels, ~104 MB, exceed the 64 MB a device call carries; mamba_build finds them if installed).
set -uo pipefail
MODE=${1:-run}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${GPU_WHEELS:-$REPO/gpu_wheels}
OUT=${OUT:-$REPO/gpu_check_out}
PY=${PYTHON:-python3}
SCRATCH=${DSM_SCRATCH:-$(mktemp -d "${TMPDIR:-/tmp}/dsm_gpu.XXXXXX")}   # build, stand-ins, results
SITE=${DSM_SITE:-$SCRATCH/site}
TOTAL=${GPU_CHECK_SECONDS:-460}   # the whole run; the benchmark part gets what the steps before it leave
PLATFORM="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# not on the GPU machine's image (the device tool's KINDS.md): nnU-Net and what it imports
WHEEL_PINS="nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6
 blosc2==4.14.1 ndindex==1.10.1 numexpr==2.14.2 connected-components-3d==4.1.1 nibabel==5.4.2 pydicom==3.0.2"
MAMBA_PIN=mamba-ssm==2.3.2.post1

if [ "$MODE" = "--fetch" ]; then
  set -e
  mkdir -p "$WHEELS"
  for pin in $WHEEL_PINS; do
    $PY -m pip download -q --no-deps --only-binary=:all: $PLATFORM -d "$WHEELS" "$pin"
  done
  $PY -m pip wheel -q --no-deps -w "$WHEELS" acvl-utils==0.2.6            # sdist only on PyPI: pure Python
  # the sdist: pip runs its setup.py for metadata, which needs torch (no isolation) and must skip the CUDA build
  MAMBA_SKIP_CUDA_BUILD=TRUE $PY -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
    -d "$WHEELS" "$MAMBA_PIN"
  du -sh "$WHEELS"; ls "$WHEELS"
  exit 0
fi

mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
echo "[gpu_check.sh $(date +%T)] mode $MODE, repo $REPO, wheels $WHEELS, out $OUT"
STUBS=$SCRATCH/stubs
if [ "$MODE" = "--dry-run" ]; then
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  SDIST=$(ls "$WHEELS"/mamba_ssm-*.tar.gz 2>/dev/null | head -1)
  if [ -n "$SDIST" ]; then
    $PY -m nnunetv2_dsm.benchmark.mamba_build "$SDIST" --target "$SCRATCH/dry_site" --dry-run \
      --json "$SCRATCH/build.json" > "$OUT/build.log" 2>&1 || echo "build plan failed: see build.log"
  else
    echo '{"error": "dry run: no mamba-ssm sdist in gpu_wheels/ (scripts/gpu_check.sh --fetch)"}' > "$SCRATCH/build.json"
  fi
  # shellcheck disable=SC2086
  $PY -m nnunetv2_dsm.benchmark.gpu_check --dry-run -o "$OUT" --budget "${GPU_CHECK_BUDGET:-600}" \
    --build-json "$SCRATCH/build.json" ${GPU_CHECK_ONLY:+--only $GPU_CHECK_ONLY}
  exit $?
fi

# 1. packages the machine lacks
ls "$WHEELS"/*.whl > /dev/null 2>&1 || { echo "no wheels in $WHEELS: run scripts/gpu_check.sh --fetch first"; exit 2; }
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
  || { echo "installing the wheels failed"; exit 2; }
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c "import SimpleITK" 2> /dev/null; then
  mkdir -p "$STUBS/SimpleITK"
  printf '%s\n' '"""Stand-in for the GPU check (no image is read): any use raises."""' \
    'def __getattr__(name):' \
    '    raise ImportError(f"SimpleITK stand-in of scripts/gpu_check.sh: SimpleITK.{name} is not available")' \
    > "$STUBS/SimpleITK/__init__.py"
  export PYTHONPATH=$PYTHONPATH:$STUBS
  echo "SimpleITK missing: import-only stand-in in $STUBS"
fi
$PY -c "import torch, nnunetv2, nnunetv2_dsm.nnunet_ext.nnunetv2_dsm_trainers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  || echo "WARNING: nnU-Net or the DSM trainers do not import (see above): (b)-(e) will fail; the build and (a) go on"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 2. the kernels, for this GPU only (not when $GPU_CHECK_ONLY names only sections that run the PyTorch scan)
case " ${GPU_CHECK_ONLY:-kernels} " in
  *" kernels "*|*" train_step "*|*" bench_kernel "*)
    SDIST=$(ls "$WHEELS"/mamba_ssm-*.tar.gz | head -1)
    echo "[gpu_check.sh $(date +%T)] building selective_scan_cuda from $SDIST (log: build.log)"
    $PY -m nnunetv2_dsm.benchmark.mamba_build "$SDIST" --target "$SITE" --trim-init-if-broken \
      --json "$SCRATCH/build.json" > "$OUT/build.log" 2>&1 || echo "BUILD FAILED (tail of build.log below); the check goes on with the PyTorch scan"
    tail -n 12 "$OUT/build.log";;
  *) echo '{"skipped": "GPU_CHECK_ONLY='"${GPU_CHECK_ONLY}"' needs no kernels"}' > "$SCRATCH/build.json";;
esac

# 3. the measurements, in what is left of the time
LEFT=$(( TOTAL - SECONDS ))
echo "[gpu_check.sh $(date +%T)] ${SECONDS}s so far; gpu_check with ${LEFT}s left"
# shellcheck disable=SC2086
$PY -m nnunetv2_dsm.benchmark.gpu_check -o "$OUT" --build-json "$SCRATCH/build.json" --budget $(( LEFT - 10 )) \
  ${GPU_CHECK_ONLY:+--only $GPU_CHECK_ONLY}
echo "[gpu_check.sh $(date +%T)] done in ${SECONDS}s"
