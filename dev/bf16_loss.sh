#!/usr/bin/env bash
# train --precision bf16 against fp32: the same 200 steps from the same
# initial weights and data, loss compared at every logged step.
#
#   dev/bf16_loss.sh [steps]      (run from anywhere; ~2 minutes on 2 cores)
#
# Model: Pythia-14M's shape (hidden 128, 6 layers, 4 heads, vocab 50304).
# Data: this repository's own C and Markdown text, tokenized with Pythia's
# tokenizer (dev/fixtures/tokenizer), 8 sequences of 128 tokens per step.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-200}
make -s mlkv
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
mkdir -p "$d/text"
for f in mlkv.c mlkv.h test_mlkv.c dev/bench.c README.md; do cp "$f" "$d/text/$(basename "$f").txt"; done
python3 tokenize.py shards --tokenizer dev/fixtures/tokenizer/pythia-tokenizer.json --out "$d/data" \
    --separator $'\n\n' --val-fraction 0.05 "$d/text" > /dev/null
cat > "$d/config.json" <<'JSON'
{"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 50304,
 "hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 512,
 "hidden_act": "gelu", "rotary_pct": 0.25, "rotary_emb_base": 10000, "layer_norm_eps": 1e-05,
 "max_position_embeddings": 2048, "initializer_range": 0.02, "use_parallel_residual": true,
 "tie_word_embeddings": false}
JSON
./mlkv init --config "$d/config.json" --out "$d/init" --seed 1 > /dev/null
for p in fp32 bf16; do
    ./mlkv train --model "$d/init" --train "$d/data/train.bin" --out "$d/$p" --precision "$p" --batch 8 --seq 128 \
        --grad-accum 1 --steps "$steps" --lr 1e-3 --warmup-steps 20 --eval-every 0 --save-every 0 > "$d/$p.out"
done
# log columns: step, loss, lr, grad norm, tokens/s, val loss
python3 - "$d/fp32.log.csv" "$d/bf16.log.csv" <<'PY'
import csv, sys
rows = [list(csv.reader(open(path)))[1:] for path in sys.argv[1:]]
fp32 = {int(r[0]): float(r[1]) for r in rows[0]}
bf16 = {int(r[0]): float(r[1]) for r in rows[1]}
worst = max(abs(bf16[s] - fp32[s]) / fp32[s] for s in fp32)
speed = [sum(float(r[4]) for r in rs[1:]) / len(rs[1:]) for rs in rows]
for s in sorted(fp32):
    if s in (1, 2, 5) or s % 25 == 0:
        print(f"step {s:4d}: loss fp32 {fp32[s]:.4f}  bf16 {bf16[s]:.4f}  ({(bf16[s] - fp32[s]) / fp32[s]:+.2%})")
print(f"{len(fp32)} steps: largest relative difference of the loss {worst:.2%}; "
      f"tokens/s fp32 {speed[0]:.0f}, bf16 {speed[1]:.0f}")
sys.exit(0 if worst < 0.01 else 1)
PY
