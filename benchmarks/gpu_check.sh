#!/usr/bin/env bash
# The GPU checks in one go, on a CUDA machine (CI never has one): the GPU-marked tests (AMP bf16
# and fp16, channels_last, torch.compile, no host syncs), the step benchmark and the loop benchmark
# (whole training loops, data included) in fp32 and bf16 + channels_last at the demo size and the
# paper's VOC size, the 80-epoch VOC run's hours projected from the 513 steps
# (benchmarks/project_voc_run.py), a torchrun (NCCL) training smoke run and AMP smoke runs.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -u
out=${1:-results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() { echo; echo "=== $*"; }
step environment
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step GPU-marked tests
timeout 240 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_bench.py tests/test_evaluate.py \
    tests/test_checkpoint.py tests/test_metrics.py
bench() { local name=$1; shift; timeout 180 $py -m gtaseg.cli bench --device cuda --out "$out/bench_$name.json" "$@"; }
step bench demo fp32;            bench demo_fp32 --steps 20 --warmup 3
step bench demo bf16 + NHWC;     bench demo_bf16_cl --steps 20 --warmup 3 --amp bf16 --channels-last
step bench VOC 513 fp32;         bench voc_fp32 --config configs/voc_classic.yaml --size 513 --batch 3 --steps 8
step bench VOC 513 bf16 + NHWC;  bench voc_bf16_cl --config configs/voc_classic.yaml --size 513 --batch 3 --steps 8 --amp bf16 --channels-last
step "VOC aug 80 epochs (866 iterations each), projected from the 513 steps"
for b in voc_fp32 voc_bf16_cl; do
    $py benchmarks/project_voc_run.py "$out/bench_$b.json" --config configs/voc_aug.yaml \
        --out "$out/projection_$b.md"
done
loop() { local name=$1; shift; timeout 300 $py -m gtaseg.cli bench-loop --device cuda --work "$out/bench_loop" --out "$out/bench_loop_$name.json" "$@"; }
step loop bench 64 px fp32;               loop 64_fp32 --rounds 3
step loop bench 64 px bf16 + NHWC;        loop 64_bf16_cl --rounds 3 --amp bf16 --channels-last
step loop bench VOC 513 fp32;             loop voc_fp32 --config configs/voc_classic.yaml --size 513 --batch 3 --n-train 256 --rounds 2 --step-steps 8
step loop bench VOC 513 bf16 + NHWC;      loop voc_bf16_cl --config configs/voc_classic.yaml --size 513 --batch 3 --n-train 256 --rounds 2 --step-steps 8 --amp bf16 --channels-last
step training smoke runs
data=$out/data
$py -m gtaseg.cli make-data --root "$data" --n-train 64 --n-val 16 --size 32 >/dev/null
$py -m gtaseg.cli split --set data.root="$data" --amount 1/4 --out "$out/split" >/dev/null
common=(data.root="$data" data.split_dir="$out/split" data.crop_size=32 eval.crop_size=32
        train.device=cuda train.epochs=2 data.num_workers=2)
timeout 120 torchrun --standalone --nproc_per_node 1 -m gtaseg.cli train --no-progress \
    --out "$out/run_torchrun" --set "${common[@]}" && echo "torchrun (NCCL) run: OK"
for amp in bf16 fp16; do
    timeout 120 $py -m gtaseg.cli train --no-progress --out "$out/run_$amp" \
        --set "${common[@]}" train.amp=$amp train.channels_last=true && echo "amp $amp run: OK"
done
