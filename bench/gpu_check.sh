#!/usr/bin/env bash
# One GPU session in as few commands as possible, from the repository root:
#
#   bash bench/gpu_check.sh [tests] [bench] [layers] [profile]   (none named: all four)
#
# tests:   the tests whose result depends on the device (attention paths with the cuDNN kernel,
#          PyTorch parity at float32, the chunked loss against the whole logits) on the GPU;
# bench:   python bench/bench.py --device gpu (flax-lm vs PyTorch eager and torch.compile,
#          GPT-2 124M and RoBERTa base), results also copied to the output folder;
# layers:  flax-lm alone with the layer loop GPUs do not take by default (scanned), to check
#          the backend choice (flax_lm/backend.py: unrolled on GPUs) against bench's figures;
# profile: one bfloat16 GPT-2 124M train step (batch 32) traced with jax.profiler.
# With a lent device's ~15 minutes (machine start included), in this order, one call each:
#   bash bench/gpu_check.sh bench            (docs/performance.md's GPU figures and the targets)
#   bash bench/gpu_check.sh layers tests     (the backend's layer-loop choice; device parity)
# and `profile` only with time left. bench/gpu_estimate.py's table says what to expect.
# Output: $OUT if set (the device runner's folder), else bench/results/gpu-check/.
# Needs jax with CUDA, flax, optax, orbax, transformers, torch, pytest; not `datasets`.
set -u
OUT_DIR=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAGES=${*:-tests bench layers profile}
status=0

nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', \
torch.__version__, torch.cuda.is_available())" 2>&1 | tail -1 | tee "$OUT_DIR/versions.txt"

for stage in $STAGES; do
  echo "== $stage ($(date -u +%T))"
  case $stage in
    tests)
      JAX_PLATFORMS=cuda timeout 300 python -m pytest tests/test_attention.py tests/test_models.py \
        tests/test_output.py -k "not eight_devices" -q -p no:cacheprovider -rs 2>&1 | tee "$OUT_DIR/tests.txt" | tail -15
      status=$((status | PIPESTATUS[0])) ;;
    bench)
      timeout 540 python bench/bench.py --device gpu --workdir "$OUT_DIR/bench-work" \
        2>&1 | tee "$OUT_DIR/bench.txt" | tail -25
      status=$((status | PIPESTATUS[0]))
      cp bench/results/*.json "$OUT_DIR/" ;;
    layers)
      timeout 300 python bench/bench.py --device gpu --layers scanned --torch_modes none \
        --batch_size 32 --configs gpt2-124m --out "$OUT_DIR/layers-scanned.json" \
        --workdir "$OUT_DIR/layers-work" 2>&1 | tee "$OUT_DIR/layers.txt" | tail -8
      status=$((status | PIPESTATUS[0])) ;;
    profile)
      timeout 240 python bench/profile_step.py --config gpt2-124m --dtype bfloat16 \
        --batch_size 32 --top 40 --trace_dir "$OUT_DIR/trace" 2>&1 \
        | tee "$OUT_DIR/profile.txt" | tail -45
      status=$((status | PIPESTATUS[0])) ;;
    *) echo "unknown stage $stage (tests, bench, layers, profile)" >&2; exit 2 ;;
  esac
done
exit $status
