#!/usr/bin/env bash
# What a lent GPU must confirm, in ONE device call, from the repository root:
#
#   bash bench/gpu_check.sh            the check (under 7 minutes on an H100 or H200)
#   bash bench/gpu_check.sh --full     ... then PyTorch eager, GPT-2 at batch 64, the layer-loop
#                                      A/B and a profiled step (another ~8 minutes: a second call)
#   bash bench/gpu_check.sh --dry      the same stages with micro models on the CPU (a test runs it)
#
# Stages and the device time each is expected to take (H200; an H100 is within ~20%):
#   versions     ~15 s   python, jax and its CUDA plugin, cuDNN, torch, the device (versions.txt)
#   attention    ~45 s   cuDNN's fused attention against the reference, forward and gradients,
#                        causal and padded (tests/test_attention.py on the GPU), and the fallback:
#                        what settle_attention decides on this machine (attention.txt)
#   bench        ~300 s  bench/accel.py: the matmul peak, then flax-lm and torch.compile on
#                        GPT-2 124M batch 32 and RoBERTa-base batch 128, each PyTorch side started
#                        from flax-lm's weights on its tokens: the loss check fails the run when the
#                        losses differ beyond bench/accel.py LOSS_TOLERANCE (bench.json)
#   with --full:
#   eager        ~150 s  PyTorch eager beside the above, and GPT-2 at batch 64 (bench-full.json)
#   layers       ~120 s  flax-lm with the layer loop GPUs do not take (scanned): flax_lm/backend.py's
#                        choice checked against bench's figures (layers-scanned.json)
#   profile      ~90 s   one bfloat16 GPT-2 124M step traced with jax.profiler (trace/)
# Machine start and file transfer come on top: keep the call's timeout at 600 s.
#
# Needs what the device image has: Python 3.12, jax with its CUDA plugin, flax, optax, orbax,
# transformers, torch, pytest (not `datasets`). Wheels for anything else go in WHEELS_DIR
# (default shared/wheels), installed from there without an index before the first stage.
# Output: $OUT if set (the device runner's folder), else bench/results/gpu-check/; summary.json
# says which stages passed. The exit status is non-zero when any stage failed.
set -u
FULL=0 DRY=0
for arg in "$@"; do
  case $arg in
    --full) FULL=1 ;;
    --dry) DRY=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--full] [--dry]" >&2; exit 2 ;;
  esac
done
OUT_DIR=${OUT:-bench/results/gpu-check}
WHEELS_DIR=${WHEELS_DIR:-shared/wheels}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SCALE=1  # the stages' time limits: a CPU (--dry), shared with others, takes several times longer
if [ "$DRY" = 1 ]; then
  SCALE=6 PLATFORM=cpu CONFIGS=micro-clm,micro-mlm STEPS=2 PEAK=64 EXPECT=() TORCH_MODES=eager
  ATTENTION_TESTS=fast_kernel_that_fails  # the stage's command, on one quick test: the suite runs them all
else
  PLATFORM=cuda CONFIGS=gpt2-124m,roberta-base STEPS=20 PEAK=4096,8192 EXPECT=(--expect_platform gpu)
  TORCH_MODES=compile ATTENTION_TESTS="cudnn or implementations_equal or fast_kernel"
fi
export JAX_PLATFORMS=$PLATFORM
declare -A RESULT
status=0

run_stage() {  # name, timeout in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%T))"
  local started=$SECONDS
  timeout $((limit * SCALE)) "$@" > "$OUT_DIR/$name.txt" 2>&1
  local rc=$?
  tail -20 "$OUT_DIR/$name.txt"
  RESULT[$name]="{\"status\": $rc, \"seconds\": $((SECONDS - started))}"
  [ "$rc" = 0 ] || status=1
}

if [ -d "$WHEELS_DIR" ] && ls "$WHEELS_DIR"/*.whl > /dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps "$WHEELS_DIR"/*.whl 2>&1 | tail -3
fi

run_stage versions 60 python -c "
import platform, jax, jaxlib, torch, flax, transformers
from importlib.metadata import distributions
plugins = sorted(f'{d.metadata[\"Name\"]} {d.version}' for d in distributions()
                 if 'cuda' in (d.metadata['Name'] or '').lower() or 'cudnn' in (d.metadata['Name'] or '').lower())
print('python', platform.python_version(), '| jax', jax.__version__, jaxlib.__version__, '| flax',
      flax.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__,
      'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
print('devices', jax.devices())
print('\n'.join(plugins))"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1

# The kernel against the reference (skipped on a CPU: there its call runs through XLA), and what
# a training run on this machine would decide (flax_lm/models/attention.py settle_attention).
run_stage attention 150 bash -c "python -m pytest -o addopts= tests/test_attention.py -q -p no:cacheprovider -rs \
  -k '$ATTENTION_TESTS' && python -c \"
from flax_lm.backend import platform
from flax_lm.models.attention import attention_choice, settle_attention
for causal, length in ((True, 512), (False, 128)):
    print(causal, length, settle_attention(attention_choice(platform(), 'bfloat16'), heads=12,
          head_dim=64, length=length, causal=causal, dtype='bfloat16', attn_dropout=0.0))\""

run_stage bench 420 python bench/accel.py --configs "$CONFIGS" --first_batch_only --steps "$STEPS" \
  --torch_modes "$TORCH_MODES" --peak_sizes "$PEAK" --out "$OUT_DIR/bench.json" \
  --workdir "$OUT_DIR/bench-work" "${EXPECT[@]}"

if [ "$FULL" = 1 ]; then
  run_stage eager 420 python bench/accel.py --configs "$CONFIGS" --steps "$STEPS" \
    --torch_modes eager,compile --peak_sizes "$PEAK" --out "$OUT_DIR/bench-full.json" \
    --workdir "$OUT_DIR/eager-work" "${EXPECT[@]}"
  run_stage layers 300 python bench/accel.py --configs "${CONFIGS%%,*}" --first_batch_only \
    --layers scanned --torch_modes none --steps "$STEPS" --peak_sizes "$PEAK" \
    --out "$OUT_DIR/layers-scanned.json" --workdir "$OUT_DIR/layers-work" "${EXPECT[@]}"
  profile_config=gpt2-124m
  [ "$DRY" = 1 ] && profile_config=micro-clm
  run_stage profile 240 python bench/profile_step.py --config "$profile_config" --dtype bfloat16 \
    --batch_size 32 --top 40 --trace_dir "$OUT_DIR/trace"
fi

{
  echo "{"
  sep=""
  for name in "${!RESULT[@]}"; do printf '%s  "%s": %s' "$sep" "$name" "${RESULT[$name]}"; sep=$',\n'; done
  printf '\n}\n'
} > "$OUT_DIR/summary.json"
cat "$OUT_DIR/summary.json"
exit $status
