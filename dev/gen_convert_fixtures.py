"""References for `mlkv convert` and `mlkv export`, from an independent PyTorch
statement of the reference converter (github.com/zaydzuhri/pythia-mlkv: split
the fused QKV, mean-pool K/V head groups, fold non-owning layers into their
owner by a running pairwise average, grow the MLPs). Run on a machine with torch,
transformers and safetensors (the device machine), from the repository root:

    python3 dev/gen_convert_fixtures.py fixture dev/fixtures/convert
        A tiny Pythia (hidden 64, 4 layers, 4 heads) saved by HF save_pretrained
        in fp16 (pythia/), and expected.safetensors: for every conversion in
        TINY, the pooled K/V of each owning layer ("NAME/<tensor>") and layer 0's
        grown MLP, with the expected intermediate sizes in the metadata.
        test_mlkv.c converts pythia/ with ./mlkv and compares.

    python3 dev/gen_convert_fixtures.py check ./mlkv ./logits WORKDIR
        The proof at full size: a random Pythia-160M-shaped checkpoint in fp16,
        every configuration of the reference grid converted by ./mlkv and by
        this script, every tensor compared; ./logits (dev/logits.c) against
        GPTNeoXForCausalLM on the original; a converted MLKV model against
        dev/gen_fixtures.py's module at T = 64; and `mlkv export --fused`
        loaded back into HF.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import kv_owners, mlkv_forward  # noqa: E402

# name, kv_layers, kv_heads, options (L = 4, H = 4)
TINY = [
    ("mha", 4, 4, {}), ("gqa", 4, 2, {}), ("mlkv_l2h4", 2, 4, {}), ("mqa", 4, 1, {}),
    ("mlkv_l2h2", 2, 2, {}), ("mlkv_l3h1", 3, 1, {}), ("mlkv_l2h1", 2, 1, {}), ("mlkv_l1h1", 1, 1, {}),
    ("uniform_l3h2", 3, 2, {"pool": "uniform"}), ("map_0020", 0, 2, {"map": [0, 0, 2, 0]}),
    ("zero_l1h1", 1, 1, {"grow": "zero"}), ("kvmlp_l2h1", 2, 1, {"kv_mlp": True}),
]
# the reference grid for Pythia-160M (L = 12, H = 12)
GRID = [("MHA-144", 12, 12), ("GQA-48", 12, 4), ("MLKV-48", 4, 12), ("MQA-12", 12, 1), ("MLKV-12", 4, 3),
        ("MLKV-6", 6, 1), ("MLKV-4", 4, 1), ("MLKV-2", 2, 1), ("MLKV-1", 1, 1)]


def layer_map(L, kv_layers, explicit=None):
    if explicit:
        return list(explicit)
    owners = kv_owners(L, kv_layers)
    return [max(o for o in owners if o <= l) for l in range(L)]


def sizes(cfg, kvL, kvH, kv_mlp):
    """Section 2 steps 4 and 5, in Python's own integer and rounding rules."""
    H, L, C = cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["hidden_size"]
    hs = C // H
    heads_lost = H * L - kvH * kvL
    params_lost = heads_lost * (C * hs * 2 + hs * 2)
    if kv_mlp:
        needed = (params_lost // kvL) // 2 + kvH * hs * C
        return cfg["intermediate_size"], int(round(needed / (C + kvH * hs)))
    add = int(round((params_lost // L) / C))
    return cfg["intermediate_size"] + add // 2, 0


def reference_convert(sd, cfg, kvL, kvH, opts):
    """Returns (tensors, intermediate, kv_intermediate); KV-MLP random parts omitted."""
    H, L, C = cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["hidden_size"]
    hs, I0 = C // H, cfg["intermediate_size"]
    out = {n: t.float() for n, t in sd.items() if "query_key_value" not in n and not n.endswith(
        ("attention.bias", "attention.masked_bias", "inv_freq"))}
    K, V = {}, {}
    for l in range(L):  # step 1: per-head split of the fused projection
        p = f"gpt_neox.layers.{l}.attention."
        w = sd[p + "query_key_value.weight"].float().view(H, 3, hs, C)
        b = sd[p + "query_key_value.bias"].float().view(H, 3, hs)
        out[p + "query.weight"] = w[:, 0].reshape(H * hs, C)
        out[p + "query.bias"] = b[:, 0].reshape(H * hs)
        K[l] = (w[:, 1], b[:, 1])
        V[l] = (w[:, 2], b[:, 2])
    g = H // kvH
    for D in (K, V):  # step 2: mean of each group of g heads
        for l in range(L):
            w, b = D[l]
            D[l] = (torch.stack([w[j * g:(j + 1) * g].mean(0) for j in range(kvH)]).reshape(kvH * hs, C),
                    torch.stack([b[j * g:(j + 1) * g].mean(0) for j in range(kvH)]).reshape(kvH * hs))
    kv_of = layer_map(L, kvL, opts.get("map"))
    kvL = len(set(kv_of))
    for D in (K, V):  # step 3: into the owners
        if opts.get("pool") == "uniform":
            for p_ in sorted(set(kv_of)):
                group = [l for l in range(L) if kv_of[l] == p_]
                D[p_] = tuple(torch.stack([D[l][k] for l in group]).mean(0) for k in range(2))
        else:
            for i in range(L):
                if kv_of[i] != i:
                    p_ = kv_of[i]
                    D[p_] = tuple(torch.stack([D[i][k], D[p_][k]]).mean(0) for k in range(2))
    I, kvI = sizes(cfg, kvL, kvH, opts.get("kv_mlp", False))
    for l in sorted(set(kv_of)):
        p = f"gpt_neox.layers.{l}.attention."
        for name, D in (("key", K), ("value", V)):
            if opts.get("kv_mlp"):
                out[p + name + ".pooled_weight"], out[p + name + ".pooled_bias"] = D[l]
            else:
                out[p + name + ".weight"], out[p + name + ".bias"] = D[l]
    if I > I0:  # step 4: grow the MLPs with copies of the first neurons
        for l in range(L):
            p = f"gpt_neox.layers.{l}.mlp."
            fw, fb, pw = out[p + "dense_h_to_4h.weight"], out[p + "dense_h_to_4h.bias"], out[p + "dense_4h_to_h.weight"]
            extra = I - I0
            out[p + "dense_h_to_4h.weight"] = torch.cat([fw, fw[:extra]], 0)
            out[p + "dense_h_to_4h.bias"] = torch.cat([fb, fb[:extra]], 0)
            new_cols = torch.zeros_like(pw[:, :extra]) if opts.get("grow") == "zero" else pw[:, :extra]
            out[p + "dense_4h_to_h.weight"] = torch.cat([pw, new_cols], 1)
    return out, I, kvI


def convert_args(kvL, kvH, opts):
    args = ["--kv-heads", str(kvH)]
    args += ["--kv-map", ",".join(map(str, opts["map"]))] if "map" in opts else ["--kv-layers", str(kvL)]
    if opts.get("pool"):
        args += ["--pool", opts["pool"]]
    if opts.get("grow"):
        args += ["--grow-mlp", opts["grow"]]
    if opts.get("kv_mlp"):
        args += ["--kv-mlp"]
    return args


def make_pythia(path, cfg_overrides, dtype=torch.float16, seed=0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(**cfg_overrides)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than HF's init so that pooling visibly matters
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.1))
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return model


TINY_CFG = dict(vocab_size=32, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                rotary_pct=0.25, partial_rotary_factor=0.25, rotary_emb_base=10000, rope_theta=10000,
                max_position_embeddings=64, use_parallel_residual=True)


def fixture(out_dir):
    pythia = os.path.join(out_dir, "pythia")
    make_pythia(pythia, TINY_CFG)
    cfg = json.load(open(os.path.join(pythia, "config.json")))
    cfg.setdefault("intermediate_size", TINY_CFG["intermediate_size"])
    sd = load_file(os.path.join(pythia, "model.safetensors"))
    expected, meta = {}, {}
    for name, kvL, kvH, opts in TINY:
        ref, I, kvI = reference_convert(sd, TINY_CFG, kvL, kvH, opts)
        meta[name] = json.dumps({"args": convert_args(kvL, kvH, opts), "intermediate_size": I,
                                 "kv_intermediate_size": kvI})
        for n, t in ref.items():
            if ".attention.key" in n or ".attention.value" in n or (n.startswith("gpt_neox.layers.0.mlp.") and I > 128):
                expected[f"{name}/{n}"] = t.contiguous()
    save_file(expected, os.path.join(out_dir, "expected.safetensors"), metadata=meta)
    print("wrote", out_dir, len(expected), "tensors")


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def c_logits(logits_bin, model_dir, ids, work):
    B, T = ids.shape
    ids.numpy().astype(np.int32).tofile(os.path.join(work, "ids.bin"))
    run([logits_bin, model_dir, os.path.join(work, "ids.bin"), str(B), str(T), os.path.join(work, "logits.bin")])
    return torch.from_numpy(np.fromfile(os.path.join(work, "logits.bin"), dtype=np.float32)).view(B, T, -1)


def check(mlkv_bin, logits_bin, work):
    from transformers import GPTNeoXForCausalLM
    os.makedirs(work, exist_ok=True)
    pythia = os.path.join(work, "pythia-160m-random")
    cfg160 = dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, rotary_pct=0.25, partial_rotary_factor=0.25, rotary_emb_base=10000,
                  rope_theta=10000, max_position_embeddings=2048, use_parallel_residual=True)
    make_pythia(pythia, cfg160)
    sd = load_file(os.path.join(pythia, "model.safetensors"))
    print("| config | tensors | max abs diff vs PyTorch | intermediate | params |")
    print("|---|---|---|---|---|")
    for name, kvL, kvH in GRID + [("MLKV-12 KV-MLP", 4, 3)]:
        opts = {"kv_mlp": True} if "KV-MLP" in name else {}
        out = os.path.join(work, name.replace(" ", "_"))
        run([mlkv_bin, "convert", pythia, "--out", out] + convert_args(kvL, kvH, opts))
        ours = load_file(os.path.join(out, "model.safetensors"))
        ref, I, kvI = reference_convert(sd, cfg160, kvL, kvH, opts)
        worst, count = 0.0, 0
        for n, t in ref.items():
            if n.endswith((".pooled_weight", ".pooled_bias")):  # KV-MLP: the first rows of dense_in
                mine = ours[n.replace(".pooled_", ".dense_in.")][: t.shape[0]]
            else:
                mine = ours[n]
            assert mine.shape == t.shape, (name, n, mine.shape, t.shape)
            worst = max(worst, (mine - t).abs().max().item())
            count += 1
        extra = set(ours) - set(ref) - {n.replace(".pooled_", ".dense_in.") for n in ref}
        if opts:  # the randomly initialised KV-MLP tensors: shapes and ranges
            for n in extra:
                bound = 1.0 if n.endswith("bias") else 1.0 / math.sqrt(ours[n].shape[1])
                assert ours[n].abs().max().item() <= bound * (1 + 1e-6), n
        else:
            assert not extra, extra
        cfg_out = json.load(open(os.path.join(out, "config.json")))
        nparams = sum(t.numel() for t in ours.values())
        print(f"| {name} | {count} | {worst:.3g} | {cfg_out['intermediate_size']}"
              f"{' kvI ' + str(cfg_out.get('kv_intermediate_size')) if opts else ''} | {nparams:,} |", flush=True)
        assert cfg_out["intermediate_size"] == I and worst < 1e-6, name
    # the C forward pass against HF on the original checkpoint
    torch.manual_seed(1)
    ids = torch.randint(0, 50304, (2, 64))
    hf = GPTNeoXForCausalLM.from_pretrained(pythia, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(ids).logits
    got = c_logits(logits_bin, pythia, ids, work)
    print(f"C vs GPTNeoXForCausalLM logits, Pythia-160M shape, B=2 T=64: max abs diff "
          f"{(got - want).abs().max().item():.3g} (max |logit| {want.abs().max().item():.3g})")
    # a converted MLKV model against the independent module of gen_fixtures.py, both rotary modes
    for name in ("MLKV-12", "MLKV-2"):
        out = os.path.join(work, name)
        for rot in (True, False):
            cfg_out = json.load(open(os.path.join(out, "config.json")))
            cfg_out["mlkv_shared_key_rotary"] = rot
            json.dump(cfg_out, open(os.path.join(out, "config.json"), "w"))
            params = load_file(os.path.join(out, "model.safetensors"))
            with torch.no_grad():
                want = mlkv_forward(params, cfg_out, ids)
            got = c_logits(logits_bin, out, ids, work)
            print(f"C vs PyTorch MLKV module, {name} (shared keys rotated: {rot}), B=2 T=64: max abs diff "
                  f"{(got - want).abs().max().item():.3g}")
    # export --fused of the MHA conversion loads into stock HF and computes the original function
    exported = os.path.join(work, "exported")
    run([mlkv_bin, "export", os.path.join(work, "MHA-144"), "--fused", "--out", exported])
    back = GPTNeoXForCausalLM.from_pretrained(exported, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        diff = (back(ids).logits - hf(ids).logits).abs().max().item()
    print(f"export --fused of MHA-144, loaded by HF, vs the original: max abs logits diff {diff:.3g}")


if __name__ == "__main__":
    if sys.argv[1] == "fixture":
        fixture(sys.argv[2])
    else:
        check(sys.argv[2], sys.argv[3], sys.argv[4])
