#!/usr/bin/env bash
# The GPU checks, in one call: bf16's step-0 KL and trained dtypes, the test suite with CUDA visible, `rlhf demo`, a LoRA PPO run in
# bf16, one process under torchrun with NCCL (DDP and --shard), DPO with LoRA, GRPO with --compile, the vLLM rollout engine
# against the HF loop (skipped without vllm), and the memory/time
# benchmark at GPT-2-124M size on the GPU (SKIP_BENCH=1 leaves it out). Run from the repository root on a CUDA machine; results go to $OUT (default
# /tmp/gpu-check). Wheels in .whl/ (packages the machine lacks) are installed to /tmp/site first.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RLHF_CACHE_DIR=/tmp/rlhf-cache
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/summary.txt"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/summary.txt"

step "bf16: step-0 KL of a reference that copies the policy, and the trained dtypes (issue 18)"
for vm in reward shared; do
    timeout 300 python3 benchmarks/check_bf16.py --device cuda --value-model $vm 2>&1 | tail -2 | tee -a "$OUT/summary.txt"
done

step "torchrun, 1 process, NCCL: DDP, and --shard sampling with gathered and with sharded weights"
for mode in ddp shard nogather; do
    case $mode in ddp) X="";; shard) X="--shard";; nogather) X="--shard --no-gather-for-sampling";; esac
    timeout 120 torchrun --standalone --nproc_per_node 1 -m rlhf ppo --steps 3 --out /tmp/$mode $X 2>&1 \
        | tr '\r' '\n' | grep -v "it/s" | tail -2 | tee -a "$OUT/summary.txt"
done
python3 - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json
rows = {m: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")}
            for l in open(f"/tmp/{m}/metrics.jsonl")] for m in ("ddp", "shard", "nogather")}
for m in ("shard", "nogather"):
    diff = max(abs(a[k] - b[k]) for a, b in zip(rows[m], rows["ddp"]) for k in a if isinstance(a[k], float))
    print(f"{m} vs ddp: {len(rows[m])} steps, largest metric difference {diff:.2e}")
PY

step "DPO with LoRA on the GPU"
python3 -m rlhf dpo --lora-r 16 --merge-lora --n-pairs 1200 --out /tmp/dpo 2>&1 | tr '\r' '\n' | grep -v "it/s" | tail -4 | tee -a "$OUT/summary.txt"

step "rlhf demo, cold cache"
/usr/bin/time -f "demo wall %e s" python3 -m rlhf demo --out /tmp/demo > "$OUT/demo.txt" 2>&1
tail -12 "$OUT/demo.txt" | tr '\r' '\n' | grep -v "it/s\|pair/s" | tee -a "$OUT/summary.txt"
cp /tmp/demo/summary.json "$OUT/demo_summary.json" 2>/dev/null

step "LoRA PPO, bf16, merged"
python3 -m rlhf ppo --lora-r 16 --merge-lora --steps 20 --out /tmp/lora 2>&1 | tr '\r' '\n' | grep -v "it/s" | tail -6 | tee -a "$OUT/summary.txt"
python3 -c "from transformers import AutoModelForCausalLM as M; m = M.from_pretrained('/tmp/lora/policy-merged'); print('merged policy loads:', type(m).__name__)" 2>&1 | tail -1 | tee -a "$OUT/summary.txt"

step "--compile on CUDA (issue 24): GRPO on the built-in task, compiled against eager, bf16"
for c in no-compile compile; do
    timeout 300 python3 -m rlhf ppo --advantage-estimator grpo --samples-per-prompt 4 --steps 8 --$c --out /tmp/grpo-$c 2>&1 \
        | tr '\r' '\n' | grep -v "it/s" | tail -1 | tee -a "$OUT/summary.txt"
done
python3 - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, statistics
rows = {c: [json.loads(l) for l in open(f"/tmp/grpo-{c}/metrics.jsonl")] for c in ("no-compile", "compile")}
for c, r in rows.items():
    print(c, "first step %.1f s, median of the last 4 %.3f s, reward at step 8 %.3f, KL %.4f" % (
        r[0]["time/step_s"], statistics.median(x["time/step_s"] for x in r[-4:]), r[-1]["objective/reward"], r[-1]["objective/kl"]))
PY

step "tests with CUDA visible"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -25
tail -3 "$OUT/tests.txt" >> "$OUT/summary.txt"

step "vLLM rollout engine (issue 19): PPO on the built-in task, then bench_rollout at Qwen2-0.5B x 256 prompts x 512 tokens, bf16"
if python3 -c "import vllm" 2>/dev/null; then
    timeout 240 python3 -m rlhf ppo --rollout-engine vllm --steps 20 --out /tmp/ppo-vllm 2>&1 | tr '\r' '\n' | grep -v "it/s" | tail -4 | tee -a "$OUT/summary.txt"
    python3 -c "import json; r=[json.loads(l) for l in open('/tmp/ppo-vllm/metrics.jsonl')]; print('vllm bf16 mismatch: |dlogp| max', max(x['rollout/logprob_diff_max'] for x in r), 'seq ratio p05', min(x['rollout/seq_ratio_p05'] for x in r), 'p95', max(x['rollout/seq_ratio_p95'] for x in r))" 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
    timeout "${ROLLOUT_TIMEOUT:-420}" python3 benchmarks/bench_rollout.py --shapes qwen2-0.5b --prompts 256 --response 512 \
        --repeats 2 --steps 2 --json "$OUT/bench_rollout.json" 2>&1 | tee "$OUT/bench_rollout.txt" | grep "qwen2" | tee -a "$OUT/summary.txt"
else
    echo "SKIP: vllm is not installed here (pip install 'rlhf[vllm]', or put its wheels in .whl/)" | tee -a "$OUT/summary.txt"
fi

[ -n "${SKIP_BENCH:-}" ] && { step "done"; exit 0; }
step "memory and time at GPT-2-124M on the GPU"
timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/bench_memory.py --device cuda --grid 8x32,32x64 \
    --json "$OUT/bench_memory_cuda.json" 2>&1 | tee "$OUT/bench_memory_cuda.txt" | tail -20
step "done"
