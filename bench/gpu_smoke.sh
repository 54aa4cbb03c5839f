#!/usr/bin/env bash
# GPU smoke check, for a machine with one CUDA device (the `device` tool lends an H200):
#   1. the kernel tests on CUDA (Triton kernels against their PyTorch twins and bitsandbytes),
#   2. a 2-step `slimtrain train` on CUDA per engine and optimizer family, one process each
#      (with one GPU, NCCL cannot put two ranks on it; the multi-rank paths are the CPU/gloo tests),
#      which exercises every collective on the communication device (NCCL rejects CPU tensors)
#      and every random draw on the parameters' device.
# Usage: bash bench/gpu_smoke.sh [output dir]   (about 2-4 minutes on an H200, install excluded)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/gpu_smoke}}"
mkdir -p "$out"
# SMOKE_ALLOW_CPU=1 runs the same steps on CPU (to check the script itself on a machine without a GPU)
if [ -z "${SMOKE_ALLOW_CPU:-}" ]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1
fi
python -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', '| torch', torch.__version__)" | tee "$out/summary.txt"

status=0
echo "== kernel tests on CUDA" | tee -a "$out/summary.txt"
python -m pytest -q tests/test_kernels.py tests/test_adamw8bit.py tests/test_galore_adamw8bit.py tests/test_qgalore.py \
    -p no:cacheprovider > "$out/kernel_tests.txt" 2>&1 || status=1
tail -1 "$out/kernel_tests.txt" | tee -a "$out/summary.txt"

run() {  # name, then key=value overrides
    local name=$1; shift
    local t0=$SECONDS
    if python -m slimtrain train output_dir="$out/$name" train.steps=2 train.eval_every=0 data.max_eval_blocks=4 \
        train.progress=false "$@" > "$out/$name.log" 2>&1; then
        echo "ok   $name ($((SECONDS - t0)) s) $(grep -o 'final_eval_loss *[0-9.]*' "$out/$name.log" | tr -s ' ')" | tee -a "$out/summary.txt"
    else
        status=1
        echo "FAIL $name: $(grep -E 'Error|error' "$out/$name.log" | tail -1)" | tee -a "$out/summary.txt"
    fi
}
echo "== 2-step training on CUDA" | tee -a "$out/summary.txt"
for optim in adamw adamw8bit galore_adamw galore_adamw8bit lisa mezo; do
    run "fsdp_$optim" dist.engine=fsdp optim.name=$optim
done
run fsdp_galore_adafactor dist.engine=fsdp optim.name=galore_adafactor optim.args="{relative_step: false}"
for optim in adamw8bit galore_adamw8bit qgalore_adamw8bit lisa mezo sparse_mezo apollo_adamw fira_adamw; do
    run "torch_$optim" dist.engine=torch optim.name=$optim
done
run torch_galore_layerwise dist.engine=torch optim.name=galore_adamw8bit optim.args="{layerwise: true}" train.max_grad_norm=0
run fsdp_galore_layerwise dist.engine=fsdp optim.name=galore_adamw optim.args="{layerwise: true}" train.max_grad_norm=0
run fsdp_bf16 dist.engine=fsdp optim.name=galore_adamw8bit train.bf16=true
run ddp_galore dist.engine=ddp optim.name=galore_adamw
# DeepSpeed picks its accelerator from DS_ACCELERATOR: cuda here, cpu when checking the script on CPU
accel=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
DS_ACCELERATOR=${DS_ACCELERATOR:-$accel} run deepspeed_adamw dist.engine=deepspeed optim.name=adamw dist.zero_stage=2
exit $status
