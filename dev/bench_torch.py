"""PyTorch's training step at the shapes of `make bench`, for comparison.

HF transformers' GPTNeoXForCausalLM (Pythia-160M shape, random weights),
eager fp32 on the CPU, AdamW (torch.optim, foreach), gradient clipping at 1.0;
the loss is the mean cross-entropy of B x T predictions, as in mlkv.c.

    python3 dev/bench_torch.py --threads 16,8 --case 8x256 --case 1x2048

Prints tokens/s per thread count and case (mean of --steps steps after one
warm-up step), in the table layout of build/bench.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("--threads", default="16")
parser.add_argument("--case", action="append", default=[])
parser.add_argument("--steps", type=int, default=2)
args = parser.parse_args()
cases = args.case or ["8x256", "1x2048"]

config = GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
                       layer_norm_eps=1e-5, max_position_embeddings=2048, use_parallel_residual=True,
                       tie_word_embeddings=False, attn_implementation="sdpa")
torch.manual_seed(0)
model = GPTNeoXForCausalLM(config).float().train()
opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_in" not in n)
print(f"torch {torch.__version__}; matmul parameters {matmul_params}")
print("| threads | B x T | tokens/s | GFLOP/s | loss |")
print("|---|---|---|---|---|")
for threads in [int(t) for t in args.threads.split(",")]:
    torch.set_num_threads(threads)
    for case in cases:
        B, T = (int(x) for x in case.split("x"))
        tokens = torch.randint(0, config.vocab_size, (B, T + 1))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def step():
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        dt = (time.perf_counter() - t0) / args.steps
        tok_s = B * T / dt
        flops = 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * T
        print(f"| {threads} | {B} x {T} | {tok_s:.1f} | {tok_s * flops / 1e9:.0f} | {loss:.2f} |", flush=True)
