"""Reference fixtures for test_mlkv.c, made with PyTorch and HF transformers.

Run on a machine with torch, transformers and safetensors (the device machine):

    python3 dev/gen_fixtures.py dev/fixtures

For each tiny configuration it writes DIR/NAME/ with
  config.json, model.safetensors   the model the C code loads (random weights)
  ref.safetensors                  what the C code must reproduce:
    tokens  I32 [S, A, B, T+1]     S optimizer steps of A micro-batches of B rows
    logits  F32 [B, T, V]          forward of tokens[0, 0, :, :T]
    loss    F32 [1]                mean cross-entropy of that micro-batch
    grad.NAME                      d loss / d NAME for that micro-batch
    losses  F32 [S]                loss of each optimizer step (mean over A)
    norms   F32 [S]                global gradient norm before clipping
    final.NAME                     parameters after S AdamW steps
  with the optimizer settings in the safetensors metadata.

MHA configurations are computed by HF GPTNeoXForCausalLM itself and saved by
save_pretrained in the stock fused layout (attention.query_key_value), which
the C loader must also read. GQA / MQA / MLKV configurations are computed by
mlkv_forward below, an independent PyTorch statement of MLKV attention
(Zuhri et al., arXiv:2406.09297; github.com/zaydzuhri/pythia-mlkv); the script first checks that it equals HF on every MHA config.
Names of grad.* / final.* tensors are always the unfused ones.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
DEV = "cpu"  # fp32 on the CPU: exact IEEE arithmetic, no TF32 surprises

BASE = dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"],
            vocab_size=64, hidden_size=32, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=64, rotary_pct=0.5,
            rotary_emb_base=10000, layer_norm_eps=1e-5,
            max_position_embeddings=64, initializer_range=0.02,
            use_parallel_residual=True, hidden_act="gelu",
            tie_word_embeddings=False)

# name, overrides; every kvL / kvH / residual / rotary mode the issue asks for
CONFIGS = [
    ("mha", dict()),
    ("mha_seq", dict(use_parallel_residual=False)),
    ("gqa", dict(num_key_value_heads=2)),
    ("mqa", dict(num_key_value_heads=1)),
    ("mlkv_3x2", dict(num_key_value_layers=3, num_key_value_heads=2,  # 3 does not divide 4
                      mlkv_shared_key_rotary=True)),
    ("mlkv_1x1", dict(num_key_value_layers=1, num_key_value_heads=1, mlkv_shared_key_rotary=True)),
    ("mlkv_2x2_compat", dict(num_key_value_layers=2, num_key_value_heads=2,
                             mlkv_shared_key_rotary=False)),
    ("mlkv_2x4_seq", dict(num_key_value_layers=2, use_parallel_residual=False, mlkv_shared_key_rotary=True)),
    ("mlkv_kvmlp", dict(num_key_value_layers=2, num_key_value_heads=2, use_key_value_mlp=True,
                        kv_intermediate_size=24, mlkv_shared_key_rotary=True)),
    ("mlkv_map", dict(num_key_value_heads=2, mlkv_kv_layer_map=[0, 0, 2, 0])),  # layer 3 reads layer 0
]

S, A, B, T = 3, 2, 2, 8  # optimizer steps, accumulation, micro-batch, sequence
OPT = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
           clip=0.5, warmup_steps=2, steps=S, schedule="cosine")


def kv_owners(L, kvL):
    return [0] + [int((i + 1) * (L / kvL)) for i in range(kvL - 1)]


def kv_layer_of(cfg):
    """The owning layer each layer reads: an explicit map, or the reference's placement."""
    L = cfg["num_hidden_layers"]
    if cfg.get("mlkv_kv_layer_map"):
        return list(cfg["mlkv_kv_layer_map"])
    owners = kv_owners(L, cfg.get("num_key_value_layers", L))
    return [max(o for o in owners if o <= l) for l in range(L)]


def dims(cfg):
    C, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    kvH = cfg.get("num_key_value_heads", H)
    kvL = len(set(kv_layer_of(cfg)))
    hs = C // H
    return C, H, L, kvH, kvL, hs, int(hs * cfg["rotary_pct"])


def param_shapes(cfg):
    """Unfused parameter names and shapes, in the order the C code uses."""
    C, H, L, kvH, kvL, hs, _ = dims(cfg)
    I, V = cfg["intermediate_size"], cfg["vocab_size"]
    owner = kv_layer_of(cfg)
    out = [("gpt_neox.embed_in.weight", (V, C))]
    for l in range(L):
        p = f"gpt_neox.layers.{l}."
        out += [(p + "input_layernorm.weight", (C,)), (p + "input_layernorm.bias", (C,)),
                (p + "post_attention_layernorm.weight", (C,)),
                (p + "post_attention_layernorm.bias", (C,)),
                (p + "attention.query.weight", (H * hs, C)), (p + "attention.query.bias", (H * hs,))]
        if owner[l] == l and cfg.get("use_key_value_mlp"):  # the reference's KeyValueMLP
            kvI = cfg["kv_intermediate_size"]
            for kv in ("key", "value"):
                out += [(p + f"attention.{kv}.dense_in.weight", (kvI, C)),
                        (p + f"attention.{kv}.dense_in.bias", (kvI,)),
                        (p + f"attention.{kv}.dense_out.weight", (kvH * hs, kvI)),
                        (p + f"attention.{kv}.dense_out.bias", (kvH * hs,))]
        elif owner[l] == l:
            for kv in ("key", "value"):
                out += [(p + f"attention.{kv}.weight", (kvH * hs, C)),
                        (p + f"attention.{kv}.bias", (kvH * hs,))]
        out += [(p + "attention.dense.weight", (C, C)), (p + "attention.dense.bias", (C,)),
                (p + "mlp.dense_h_to_4h.weight", (I, C)), (p + "mlp.dense_h_to_4h.bias", (I,)),
                (p + "mlp.dense_4h_to_h.weight", (C, I)), (p + "mlp.dense_4h_to_h.bias", (C,))]
    out += [("gpt_neox.final_layer_norm.weight", (C,)), ("gpt_neox.final_layer_norm.bias", (C,)),
            ("embed_out.weight", (V, C))]
    return out


def random_params(cfg, gen):
    """Every tensor random (biases and LayerNorms too), large enough that
    attention is far from uniform and every term of the gradient matters."""
    P = {}
    for name, shape in param_shapes(cfg):
        if is_layernorm(name) and name.endswith("weight"):
            t = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif name.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        else:
            t = 0.3 * torch.randn(shape, generator=gen)
        P[name] = t.float()
    return P


def rotary(x, T, rd, base):
    """rotate_half on the first rd dims of x [B, nh, T, hs], as GPT-NeoX."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
    freqs = torch.arange(T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    rot = torch.cat([-x2, x1], -1)
    return torch.cat([xr * cos + rot * sin, xp], -1)


def mlkv_forward(P, cfg, ids):
    C, H, L, kvH, kvL, hs, rd = dims(cfg)
    eps, base = cfg["layer_norm_eps"], cfg["rotary_emb_base"]
    # mlkv's rule: a config with num_key_value_layers and no mlkv_shared_key_rotary
    # comes from the reference code, whose non-owning layers read un-rotated keys
    shared_rot = cfg.get("mlkv_shared_key_rotary", "num_key_value_layers" not in cfg)
    owner = kv_layer_of(cfg)
    Bn, Tn = ids.shape
    x = P["gpt_neox.embed_in.weight"][ids]
    mask = torch.ones(Tn, Tn, dtype=torch.bool).tril()
    kv = {}
    for l in range(L):
        p = f"gpt_neox.layers.{l}."
        ln = lambda z, n: F.layer_norm(z, (C,), P[p + n + ".weight"], P[p + n + ".bias"], eps)
        lin = lambda z, n: F.linear(z, P[p + n + ".weight"], P[p + n + ".bias"])
        h1 = ln(x, "input_layernorm")
        q = rotary(lin(h1, "attention.query").view(Bn, Tn, H, hs).transpose(1, 2), Tn, rd, base)
        if cfg.get("use_key_value_mlp"):
            proj = lambda z, n: lin(F.gelu(lin(z, n + ".dense_in")), n + ".dense_out")
        else:
            proj = lin
        if owner[l] == l:
            k = proj(h1, "attention.key").view(Bn, Tn, kvH, hs).transpose(1, 2)
            v = proj(h1, "attention.value").view(Bn, Tn, kvH, hs).transpose(1, 2)
            kv[l] = (k, rotary(k, Tn, rd, base), v)
        k_pre, k_rot, v = kv[owner[l]]
        k = k_rot if (owner[l] == l or shared_rot) else k_pre
        g = H // kvH
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        att = (q @ k.transpose(-1, -2)) * hs ** -0.5
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(Bn, Tn, C)
        a = lin(y, "attention.dense")
        mlp = lambda z: lin(F.gelu(lin(z, "mlp.dense_h_to_4h")), "mlp.dense_4h_to_h")
        if cfg["use_parallel_residual"]:
            x = x + a + mlp(ln(x, "post_attention_layernorm"))
        else:
            h = x + a
            x = h + mlp(ln(h, "post_attention_layernorm"))
    x = F.layer_norm(x, (C,), P["gpt_neox.final_layer_norm.weight"],
                     P["gpt_neox.final_layer_norm.bias"], eps)
    return F.linear(x, P["embed_out.weight"])


def fuse(P, cfg):
    """Unfused q/k/v -> HF's fused query_key_value, rows ordered [H, 3, hs]."""
    C, H, L, _, _, hs, _ = dims(cfg)
    out = {}
    for n, t in P.items():
        if ".attention.query." in n:
            kind = n.rsplit(".", 1)[1]
            q, k, v = (P[n.replace("query", s)] for s in ("query", "key", "value"))
            parts = [z.view(H, hs, *z.shape[1:]) for z in (q, k, v)]
            fused = torch.stack(parts, 1).reshape(3 * H * hs, *q.shape[1:])
            out[n.replace("query." + kind, "query_key_value." + kind)] = fused
        elif ".attention.key." in n or ".attention.value." in n:
            continue
        else:
            out[n] = t
    return out


def unfuse(Pf, cfg):
    C, H, L, _, _, hs, _ = dims(cfg)
    out = {}
    for n, t in Pf.items():
        if "query_key_value" in n:
            parts = t.reshape(H, 3, hs, *t.shape[1:])
            for i, s in enumerate(("query", "key", "value")):
                out[n.replace("query_key_value", s)] = parts[:, i].reshape(H * hs, *t.shape[1:])
        else:
            out[n] = t
    return out


def lr_lambda(step):
    W, Sn = OPT["warmup_steps"], OPT["steps"]
    if step < W:
        return step / max(1, W)
    progress = (step - W) / max(1, Sn - W)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def is_layernorm(name):
    return "layernorm" in name or "layer_norm" in name


def is_decayed(name):
    """HF Trainer: no decay for biases and LayerNorm parameters (final one included)."""
    return name.endswith(".weight") and not is_layernorm(name)


def train_reference(named, forward, tokens, V):
    """HF Trainer's recipe: AdamW with decay groups, clip, warmup+cosine, accumulation."""
    decay = [p for n, p in named if is_decayed(n)]
    nodecay = [p for n, p in named if not is_decayed(n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPT["weight_decay"]},
                             {"params": nodecay, "weight_decay": 0.0}],
                            lr=OPT["lr"], betas=(OPT["beta1"], OPT["beta2"]), eps=OPT["eps"],
                            foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    params = [p for _, p in named]
    losses, norms = [], []
    for s in range(S):
        opt.zero_grad()
        total = 0.0
        for a in range(A):
            tok = tokens[s, a]
            logits = forward(tok[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, V), tok[:, 1:].reshape(-1)) / A
            loss.backward()
            total += loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(params, OPT["clip"]).item())
        losses.append(total)
        opt.step()
        sched.step()
    return torch.tensor(losses), torch.tensor(norms)


HEAD_IN_MEMORY = "lm_head.weight"


def hf_model(cfg, P):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    kw = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    kw["partial_rotary_factor"] = cfg["rotary_pct"]
    kw["rope_theta"] = cfg["rotary_emb_base"]
    hcfg = GPTNeoXConfig(**kw)
    hcfg._attn_implementation = "eager"
    model = GPTNeoXForCausalLM(hcfg).float().eval()
    sd = fuse(P, cfg)
    if hasattr(model, "lm_head"):  # transformers 5 calls embed_out lm_head in memory
        sd[HEAD_IN_MEMORY] = sd.pop("embed_out.weight")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if m in sd], missing
    return model


def main(out_dir):
    gen = torch.Generator().manual_seed(1234)
    summary = {}
    for name, over in CONFIGS:
        cfg = dict(BASE, **over)
        C, H, L, kvH, kvL, hs, rd = dims(cfg)
        V = cfg["vocab_size"]
        P = random_params(cfg, gen)
        tokens = torch.randint(0, V, (S, A, B, T + 1), generator=gen)
        x0, y0 = tokens[0, 0, :, :T], tokens[0, 0, :, 1:]
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        is_mha = kvH == H and kvL == L
        if is_mha:
            model = hf_model(cfg, P)
            # the independent module must agree with HF before we trust it elsewhere
            with torch.no_grad():
                ours = mlkv_forward(P, cfg, x0)
                theirs = model(x0).logits
            diff = (ours - theirs).abs().max().item()
            assert diff < 1e-5, f"{name}: mlkv_forward differs from HF by {diff}"
            summary[name + "_hf_vs_module"] = diff
            model.save_pretrained(d, safe_serialization=True)
            named = [("embed_out.weight" if n == HEAD_IN_MEMORY else n, p)
                     for n, p in model.named_parameters()]
            forward = lambda ids: model(ids).logits
            logits = forward(x0)
            loss = F.cross_entropy(logits.reshape(-1, V), y0.reshape(-1))
            loss.backward()
            grads = unfuse({n: p.grad.clone() for n, p in named}, cfg)
            model.zero_grad()
        else:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
            save_file({n: t.contiguous() for n, t in P.items()}, os.path.join(d, "model.safetensors"))
            leaves = {n: t.clone().requires_grad_(True) for n, t in P.items()}
            named = list(leaves.items())
            forward = lambda ids: mlkv_forward(leaves, cfg, ids)
            logits = forward(x0)
            loss = F.cross_entropy(logits.reshape(-1, V), y0.reshape(-1))
            loss.backward()
            grads = {n: p.grad.clone() for n, p in named}
            for _, p in named:
                p.grad = None
        losses, norms = train_reference(named, forward, tokens, V)
        final = {n: p.detach().clone() for n, p in named}
        if is_mha:
            final = unfuse(final, cfg)
        ref = {"tokens": tokens.to(torch.int32), "logits": logits.detach(),
               "loss": loss.detach().reshape(1), "losses": losses.float(), "norms": norms.float()}
        for n in P:
            ref["grad." + n] = grads[n]
            ref["final." + n] = final[n]
        meta = {k: str(v) for k, v in OPT.items()}
        meta.update(batch=str(B), seq=str(T), grad_accum=str(A))
        save_file({k: v.contiguous().float() if v.dtype != torch.int32 else v.contiguous()
                   for k, v in ref.items()}, os.path.join(d, "ref.safetensors"), metadata=meta)
        summary[name] = dict(loss=loss.item(), losses=losses.tolist(), norms=norms.tolist())
        print(name, summary[name], flush=True)
    print(json.dumps(summary, indent=1))
    with open(os.path.join(out_dir, "mha", "config.json")) as f:
        print("HF config.json as saved:", f.read())


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1] if len(sys.argv) > 1 else "dev/fixtures")
