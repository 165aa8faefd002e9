#!/usr/bin/env bash
# The GPU check of the prefill targets, prepared to run once on a lent GPU machine (see docs/results.md,
# "GPU"): installs the carried wheels (transformers of this project's range and what it needs, which the
# machine's older transformers lacks), prints the environment, then runs the bench: every shape at full depth,
# batch 1 and 8, eager and CUDA graphs (batch 1), prefill + 32 tokens, then the launch shape (the CPU's cost of
# issuing a prefill). Budget: about 4 minutes of GPU time.
set -euo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
out=${OUT:-.}
python3 scripts/bench_prefill.py --device cuda --shape all --depth full --batch 1,8 --runs 6 --warmup 2 \
    --decode-tokens 32 2>&1 | tee "$out/bench_gpu.md"
# the CPU's cost of issuing one prefill on this machine (40 layers at a negligible width): what batch 1 waits on
python3 scripts/bench_prefill.py --device cuda --shape launch --depth full --runs 30 --warmup 5 \
    --decode-tokens 0 2>&1 | tee -a "$out/bench_gpu.md"
