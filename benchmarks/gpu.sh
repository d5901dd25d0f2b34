#!/usr/bin/env bash
# Every GPU figure in one run, for the day a GPU is lent (one H100 or H200, 16 cores, no internet; issue 31): build
# the CUDA ops, run the tests that skip without CUDA, each benchmark in bf16 against its peer, a 20-step torchrun run
# of each demo config and a short FSDP run, and write what they print to docs/gpu.md: device, torch, CUDA, commit,
# date, then one section per step with its exact command, status, wall time and output.
#
#     bash benchmarks/gpu.sh
#
# About 8 minutes: each step runs under `timeout` with its own budget (the number after its title below; they sum
# to 485 s) inside a 495 s deadline for the whole script. A step that fails or runs out of time is recorded as
# FAILED with its last lines and the next one runs; a step whose peer library is missing is SKIPPED, with the reason.
# The exit status is 1 if any step failed, else 0.
#
# Nothing is downloaded. crossmodal installs from this tree against the torch already there (no dependencies are
# resolved). The test-only peers a bare GPU image lacks (open_clip, OpenFlamingo) install from wheels in .whl/ when
# the tree carries them; on a machine with internet:
#     pip download --no-deps --only-binary=:all: -d .whl open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 \
#         open-flamingo==2.0.1 einops-exts==0.0.4
# A copy of the tree without .git cannot name its commit: give it, CROSSMODAL_COMMIT=<hash> bash benchmarks/gpu.sh.
#
# On one GPU, train.py runs one process, which joins no process group (distributed.init makes one only when
# WORLD_SIZE > 1) and which FSDP does not shard (parallel.prepare): the torchrun runs check the CUDA training path
# and the FSDP settings with their sharded checkpoint, not NCCL's collectives, which need a second GPU.
#
# Without a CUDA GPU the script says so in one line and exits with status 2, before installing or writing anything.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

cuda=$(python3 -c "import torch; print(torch.cuda.is_available())" 2>/dev/null)
if [ "$cuda" != True ]; then
  echo "benchmarks/gpu.sh: needs a CUDA GPU (torch.cuda.is_available() is" \
    "${cuda:-unknown: python3 cannot import torch}); docs/gpu.md left unchanged" >&2
  exit 2
fi

deadline=495  # seconds since the script started
work=$(mktemp -d "${TMPDIR:-/tmp}/crossmodal-gpu.XXXXXX")
runs=runs/gpu_sh  # the torchrun runs' outputs, removed at the end
report=""  # the temporary docs/gpu.md, renamed into place once complete
trap 'rm -rf "$work" "$runs"; [ -z "$report" ] || rm -f "$report"' EXIT
rm -rf "$runs"
mkdir -p "$runs"
count=0
failed=0

quoted() {  # the words as the shell would read them back, quoted only where they need it
  local word words=()
  for word in "$@"; do
    if [[ $word =~ ^[[:alnum:]_./:=,+@%-]+$ ]]; then
      words+=("$word")
    elif [[ $word != *\'* ]]; then
      words+=("'$word'")
    else
      words+=("$(printf '%q' "$word")")
    fi
  done
  echo "${words[*]}"
}

# step TITLE BUDGET_S COMMAND...: runs COMMAND under `timeout` (its budget, or what is left of the deadline) and
# appends a section to the report. Set for one call: needs=<python statement> (SKIPPED if it fails: a peer library),
# requires=<path> (SKIPPED if an earlier step did not make it), note=<a line printed under the command>.
step() {
  local title=$1 budget=$2
  shift 2
  local log="$work/step$((++count)).log" start=$SECONDS status reason="" limit rc lines
  limit=$((deadline - SECONDS < budget ? deadline - SECONDS : budget))
  if ((deadline - SECONDS < 5)); then
    reason="the script's 8 minutes are spent"
  elif [ -n "${requires:-}" ] && [ ! -e "$requires" ]; then
    reason="$requires is missing (an earlier step makes it)"
  elif [ -n "${needs:-}" ] && ! timeout "$limit" python3 -c "$needs" >"$log" 2>&1; then
    reason="\`python3 -c \"$needs\"\` fails here: $(tail -n 1 "$log")"
  fi
  if [ -n "$reason" ]; then
    status=SKIPPED
    : >"$log"
  else
    limit=$((limit - (SECONDS - start)))
    timeout --kill-after=2 "$limit" "$@" >"$log" 2>&1 </dev/null
    rc=$?
    case $rc in
      0) status=ok ;;
      124 | 137) status=FAILED reason="timed out after $limit s" ;;
      *) status=FAILED reason="exit status $rc" ;;
    esac
  fi
  local wall=$((SECONDS - start))
  [ "$status" != FAILED ] || failed=1
  lines=$([ "$status" = ok ] && echo 60 || echo 30)
  printf '| %s | %s | %d | %d |\n' "$title" "$status" "$wall" "$budget" >>"$work/summary.md"
  {
    # shellcheck disable=SC2016  # the backquotes are markdown's code fences
    printf '\n## %s\n\n```bash\n%s\n```\n\n' "$title" "$(quoted "$@")"
    [ -z "${note:-}" ] || printf '%s\n\n' "$note"
    printf '**%s** in %d s (budget %d s)%s\n' "$status" "$wall" "$budget" "${reason:+: $reason}"
    if [ -s "$log" ]; then
      printf '\n```text\n'
      tail -n "$lines" "$log"
      printf '```\n'
    fi
  } >>"$work/sections.md"
  printf '%-8s %3d s / %3d s  %s%s\n' "$status" "$wall" "$budget" "$title" "${reason:+ ($reason)}"
}

# What the run was measured on, read before anything is installed.
commit=${CROSSMODAL_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no .git here; set CROSSMODAL_COMMIT)")}
[ -z "$(git status --porcelain 2>/dev/null)" ] || commit+=" with uncommitted changes"
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
nvcc_version=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo "not found")
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
python3 - >"$work/machine.md" <<'PY'
import os

import torch

props = torch.cuda.get_device_properties(0)
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as error:  # a torch built without NCCL
    nccl = f"none ({type(error).__name__})"
print(f"| device | {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
      f"{props.multi_processor_count} SMs |")
print(f"| torch | {torch.__version__} |")
print(f"| CUDA | {torch.version.cuda} (cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}) |")
print(f"| CPU cores | {os.cpu_count()} |")
PY

# Set-up: the carried wheels, then crossmodal with its CUDA ops for this GPU's architecture only (half the nvcc time
# of setup.py's default two). Should the CUDA build fail, an install without the extension lets the rest run.
if compgen -G ".whl/*.whl" >/dev/null; then
  step "Set-up: the wheels in .whl/" 10 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$work/site" .whl/*.whl
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
step "Set-up: crossmodal with its CUDA ops" 90 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
  MAX_JOBS="$(nproc)" python3 -m pip install --no-index --no-deps --no-build-isolation -e .
if ! python3 -c "import crossmodal" 2>/dev/null; then
  step "Set-up: crossmodal without its extension (the build failed)" 20 env CROSSMODAL_NO_EXTENSION=1 \
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi

# 1. The tests that skip without CUDA: the kernel tests and any other file with a CUDA skip marker, whole files, so
#    the CPU tests also run beside the CUDA build (-rs lists what still skipped, and why).
cuda_skips='skipif\(not torch\.cuda\.is_available'
mapfile -t cuda_tests < <({ ls tests/test_kernels*.py; grep -lE "$cuda_skips" tests/test_*.py; } | sort -u)
step "CUDA kernel tests" 50 python3 -m pytest -q -rs "${cuda_tests[@]}"

# 2. The matmul peaks the benchmarks' shares refer to, then the fused losses against the naive ones.
step "Matmul peaks (fp32, bf16)" 10 python3 benchmarks/flops.py --device cuda
step "InfoNCE loss, fused vs naive, bf16" 40 python3 benchmarks/bench_loss.py --device cuda --dtype bfloat16 \
  --sizes 16384 65536 262144
step "SigLIP loss, fused vs naive, bf16" 40 python3 benchmarks/bench_loss.py --device cuda --dtype bfloat16 \
  --sizes 16384 65536 262144 --loss siglip

# 3-4. Training steps against the peers, bf16 autocast on both sides.
needs="import open_clip" step "ViT-B-32 training step vs open_clip, bf16" 35 python3 benchmarks/bench_train.py \
  --device cuda --precision bf16 --settings ViT-B-32:256 --steps 10 --rounds 3 --warmup 3
needs="import transformers" step "BLIP-base step and captioning vs transformers, bf16" 40 \
  python3 benchmarks/bench_blip.py --device cuda --precision bf16 --batch 16 --rounds 3
needs="from open_flamingo.src import helpers" step "Flamingo resampler + gated cross-attention vs OpenFlamingo, bf16" \
  25 python3 benchmarks/bench_flamingo.py --device cuda --precision bf16 --preset 3b --batch 8 --rounds 5
needs="import transformers" step "LLaVA small step and greedy generation vs transformers, fp32 and bf16" 25 \
  python3 benchmarks/bench_llava.py --device cuda --config small --steps 10 --rounds 5

# 5. Each demo config for 20 steps under torchrun on the GPU, as .ci/run's smoke runs (on one process); BLIP starts
#    from the CLIP run's image tower and Flamingo from the LM run.
torchrun=(python3 -m torch.distributed.run --standalone --nproc_per_node 1)
one_process="One process: train.py makes no process group at WORLD_SIZE 1, so NCCL takes no part (it needs 2 GPUs)."
note=$one_process step "torchrun: CLIP demo, 20 steps" 25 "${torchrun[@]}" train.py \
  --config configs/clip/tiny_shapes.yaml --out_dir=$runs/clip --device=cuda --train.steps=20 --train.warmup_steps=5 \
  --train.log_every=5 --data.val=shapes:val:16 --data.heldout=shapes:heldout:16
note=$one_process requires=$runs/clip/checkpoint.pt step "torchrun: BLIP demo, 20 steps" 25 "${torchrun[@]}" train.py \
  --config configs/blip/tiny_shapes.yaml --out_dir=$runs/blip --device=cuda \
  --model.vision_checkpoint=$runs/clip/checkpoint.pt --train.steps=20 --train.warmup_steps=5 --train.log_every=5 \
  --data.tokenizer_captions=2000 --data.val=shapes:val:16 --data.heldout=shapes:heldout:16
note=$one_process step "torchrun: LM demo (Flamingo stage 1), 20 steps" 20 "${torchrun[@]}" train.py \
  --config configs/lm/tiny_shapes.yaml --out_dir=$runs/lm --device=cuda --train.steps=20 --train.warmup_steps=5 \
  --train.log_every=10 --data.tokenizer_captions=500 --data.val=shapes_icl:val:40
note=$one_process requires=$runs/lm/checkpoint.pt step "torchrun: Flamingo demo, 20 steps" 25 "${torchrun[@]}" \
  train.py \
  --config configs/flamingo/tiny_shapes.yaml --out_dir=$runs/flamingo --device=cuda \
  --flamingo.lm_checkpoint=$runs/lm/checkpoint.pt --data.tokenizer_path=$runs/lm/tokenizer.model --train.steps=20 \
  --train.warmup_steps=5 --train.log_every=5 --data.val=shapes_icl:val:8

# 6. FSDP's settings on one GPU: bf16 mixed precision and the sharded checkpoint folder.
note="One process: FSDP has nothing to shard (parallel.prepare), but the run saves FSDP's checkpoint folder." \
  step "torchrun: CLIP demo with FSDP and bf16, 20 steps" 25 "${torchrun[@]}" train.py \
  --config configs/clip/tiny_shapes.yaml --out_dir=$runs/fsdp --device=cuda --train.strategy=fsdp \
  --train.precision=bf16 --train.steps=20 --train.warmup_steps=5 --train.log_every=5 --data.val=shapes:val:16 \
  --data.heldout=shapes:heldout:16

report=$(mktemp docs/.gpu.md.XXXXXX)
{
  echo "# GPU figures"
  echo
  echo "Written by \`bash benchmarks/gpu.sh\` in $((SECONDS)) s; each section below holds the exact command, its status"
  echo "and the end of what it printed. Budgets are each step's \`timeout\`."
  echo
  echo "| | |"
  echo "|---|---|"
  cat "$work/machine.md"
  echo "| driver, nvcc | ${driver:-unknown}, ${nvcc_version} |"
  echo "| commit | $commit |"
  echo "| date | $(date -u '+%Y-%m-%d %H:%M UTC') |"
  echo
  echo "| step | status | wall s | budget s |"
  echo "|---|---|---|---|"
  cat "$work/summary.md"
  cat "$work/sections.md"
} >"$report"
chmod 644 "$report"
mv "$report" docs/gpu.md
report=""
if ((failed)); then
  echo "wrote docs/gpu.md in $SECONDS s; some steps FAILED"
else
  echo "wrote docs/gpu.md in $SECONDS s"
fi
exit "$failed"
