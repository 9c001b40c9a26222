"""Checkpoints as transformers 4 and the MLKV reference code wrote them, for test_mlkv.c.

Transformers before 4.31 kept three buffers in every GPT-NeoX layer's state dict,
so torch.save wrote them into pytorch_model.bin: attention.bias (the causal mask,
[1, 1, P, P] for P = max_position_embeddings, bool or uint8), attention.masked_bias
(a scalar) and attention.rotary_emb.inv_freq ([rotary_ndims / 2]). EleutherAI's
Pythia files on the hub carry them, and so does everything the MLKV reference code
(github.com/zaydzuhri/pythia-mlkv, pinned to transformers 4.24) writes: its
convert_to_mlkv.py torch.loads the Pythia state dict, edits it and torch.saves it
whole, and its modeling code registers the same buffers in every layer. Newer
transformers (this machine's) no longer save them, so this script writes them as
the old modules registered them, and runs the reference's own converter and model.

Run on the device machine (torch, transformers, safetensors) from the repository
root, with a checkout of the reference code:

    python3 dev/gen_hf4_fixtures.py dev/fixtures/hf4 PYTHIA_MLKV_CHECKOUT

It writes, each folder with ref.safetensors (tokens I32 [B, T] and the logits
F32 [B, T, V] that the folder's model computes on them, in fp32):
  pythia/          a tiny Pythia as the hub holds it: config.json of transformers
                   4.24, pytorch_model.bin in fp16 with the three buffers (a bool
                   mask). Logits: transformers' GPTNeoXForCausalLM.
  pythia_sharded/  the same state dict in two shards with
                   pytorch_model.bin.index.json, as save_pretrained shards larger
                   Pythias (the buffers are in the weight map too).
  mlkv/            the output of the reference's convert_to_mlkv.py on pythia/
                   (2 K/V layers of 2 heads): fp16 and fp32 tensors mixed, the
                   buffers kept. Logits: the reference's GPTNeoXForCausalLM.
  kvmlp/           convert_to_mlkv.py --use_key_value_mlp (2 layers of 1 head) on
                   pythia32/, the same Pythia saved in fp32 with a uint8 mask
                   (transformers 4.24's own dtype for it). Logits: the reference's
                   model.
  int64_extra/      pythia/'s state dict and one int64 tensor that is no GPT-NeoX
                   buffer (gpt_neox.embed_in.position_ids [1, P]): to be refused by name.
The reference's logits are also checked against gen_fixtures.mlkv_forward, the
independent statement of its function; the script stops if they differ.
"""
import collections
import importlib.util
import json
import os
import shutil
import sys
import types

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import mlkv_forward  # noqa: E402

B, T = 2, 12
# a tiny Pythia; the fields and their order are those of the hub's Pythia config.json (transformers 4.24)
CONFIG = collections.OrderedDict([
    ("architectures", ["GPTNeoXForCausalLM"]), ("bos_token_id", 0), ("eos_token_id", 0),
    ("hidden_act", "gelu"), ("hidden_size", 32), ("initializer_range", 0.02), ("intermediate_size", 64),
    ("layer_norm_eps", 1e-05), ("max_position_embeddings", 64), ("model_type", "gpt_neox"),
    ("num_attention_heads", 4), ("num_hidden_layers", 4), ("rotary_emb_base", 10000), ("rotary_pct", 0.5),
    ("tie_word_embeddings", False), ("torch_dtype", "float16"), ("transformers_version", "4.24.0"),
    ("use_cache", True), ("use_parallel_residual", True), ("vocab_size", 64)])


def pythia_state_dict(params, cfg, dtype, mask_dtype):
    """model.state_dict() of transformers 4.24's GPTNeoXForCausalLM: parameters and
    buffers in the order the modules register them (layer: the two LayerNorms, then
    attention's own buffers bias and masked_bias, rotary_emb.inv_freq, the fused
    query_key_value, dense; then the MLP). model.half() turns the float buffers to
    fp16 too (masked_bias -1e9 becomes -inf)."""
    P, C, H = cfg["max_position_embeddings"], cfg["hidden_size"], cfg["num_attention_heads"]
    rd = int(C // H * cfg["rotary_pct"])
    inv_freq = 1.0 / (cfg["rotary_emb_base"] ** (torch.arange(0, rd, 2).float() / rd))
    sd = collections.OrderedDict()
    sd["gpt_neox.embed_in.weight"] = params["gpt_neox.embed_in.weight"]
    for l in range(cfg["num_hidden_layers"]):
        p = f"gpt_neox.layers.{l}."
        for n in ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
                  "post_attention_layernorm.bias"):
            sd[p + n] = params[p + n]
        sd[p + "attention.bias"] = torch.tril(torch.ones((P, P), dtype=mask_dtype)).view(1, 1, P, P)
        sd[p + "attention.masked_bias"] = torch.tensor(-1e9)
        sd[p + "attention.rotary_emb.inv_freq"] = inv_freq.clone()
        for n in ("attention.query_key_value.weight", "attention.query_key_value.bias", "attention.dense.weight",
                  "attention.dense.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                  "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"):
            sd[p + n] = params[p + n]
    for n in ("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"):
        sd[n] = params[n]
    for n, t in sd.items():
        sd[n] = t.to(dtype).clone() if t.is_floating_point() else t
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    return sd


def write_pythia(d, sd, cfg):
    os.makedirs(d)
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)  # PretrainedConfig.to_json_file's layout


def write_sharded(d, sd, cfg):
    """save_pretrained(max_shard_size=...) of transformers 4.24: shard_checkpoint fills
    each shard in state-dict order until the next tensor would pass the size."""
    os.makedirs(d)
    names = list(sd)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    half, shards, size = total // 2, [[]], 0
    for n in names:
        nbytes = sd[n].numel() * sd[n].element_size()
        if shards[-1] and size + nbytes > half:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    weight_map = {}
    for i, part in enumerate(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(collections.OrderedDict((n, sd[n]) for n in part), os.path.join(d, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return len(shards)


def import_reference(root):
    """The reference's package, imported from its files. Its __init__ is transformers
    4's lazy loader, so the two modules are loaded by path; the docstring decorators
    it imports from transformers.file_utils (gone in transformers 5) are stood in for
    by ones that return the function unchanged, and `fire` (its command line) by a stub."""
    try:
        import transformers.file_utils  # noqa: F401
    except ImportError:
        stub = types.ModuleType("transformers.file_utils")
        for name in ("add_code_sample_docstrings", "add_start_docstrings",
                     "add_start_docstrings_to_model_forward", "replace_return_docstrings"):
            setattr(stub, name, lambda *a, **k: (lambda f: f))
        sys.modules["transformers.file_utils"] = stub
    if "fire" not in sys.modules:
        try:
            import fire  # noqa: F401
        except ImportError:
            sys.modules["fire"] = types.SimpleNamespace(Fire=lambda f: f)
    pkg = types.ModuleType("gpt_neox_mlkv")
    pkg.__path__ = [os.path.join(root, "gpt_neox_mlkv")]
    sys.modules["gpt_neox_mlkv"] = pkg
    for name in ("configuration_gpt_neox", "modeling_gpt_neox"):
        spec = importlib.util.spec_from_file_location(f"gpt_neox_mlkv.{name}",
                                                      os.path.join(root, "gpt_neox_mlkv", name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(pkg, name, module)
    pkg.GPTNeoXConfig = pkg.configuration_gpt_neox.GPTNeoXConfig
    pkg.GPTNeoXForCausalLM = pkg.modeling_gpt_neox.GPTNeoXForCausalLM
    spec = importlib.util.spec_from_file_location("convert_to_mlkv", os.path.join(root, "convert_to_mlkv.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    return pkg, convert


def reference_convert(convert, src, out, kv_layers, kv_heads, kv_mlp):
    """The reference's convert_to_mlkv.main, as its README runs it. Its last step loads
    the result with from_pretrained to print the parameter count; under transformers 5
    that step may fail after every file is written, which is reported, not fatal."""
    os.makedirs(out)  # main() makes the folder only when it names it itself
    try:
        convert.main(src, kv_layers, kv_heads, output_path=out, use_key_value_mlp=kv_mlp)
    except Exception as e:  # noqa: BLE001
        print(f"  (convert_to_mlkv's closing from_pretrained check failed here: {type(e).__name__}: {e})")
    assert sorted(os.listdir(out)) == ["config.json", "pytorch_model.bin"], os.listdir(out)


def reference_logits(pkg, d, tokens):
    """The reference's GPTNeoXForCausalLM on folder d's weights in fp32."""
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    model = pkg.GPTNeoXForCausalLM(pkg.GPTNeoXConfig(**cfg)).float().eval()
    if not hasattr(model.gpt_neox, "get_head_mask"):  # transformers 5 dropped head masks
        model.gpt_neox.get_head_mask = lambda mask, n: [None] * n
    sd = torch.load(os.path.join(d, "pytorch_model.bin"), weights_only=True)
    missing, unexpected = model.load_state_dict({n: t.float() if t.is_floating_point() else t
                                                 for n, t in sd.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        out = model(tokens.long(), use_cache=False, output_attentions=False, output_hidden_states=False,
                    return_dict=False)
    return out[0], cfg, sd


def write_ref(d, tokens, logits):
    save_file({"tokens": tokens, "logits": logits.float().contiguous()}, os.path.join(d, "ref.safetensors"))


def main(out_dir, reference_root):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    pkg, convert = import_reference(reference_root)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    cfg = dict(CONFIG)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"})).eval()
    with torch.no_grad():  # larger than HF's init so that every weight matters
        for n, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.1))
    params = {("embed_out.weight" if n == "lm_head.weight" else n): t.detach()
              for n, t in hf.state_dict().items() if not n.endswith("inv_freq")}
    tokens = torch.randint(0, cfg["vocab_size"], (B, T), generator=torch.Generator().manual_seed(7)).to(torch.int32)

    # the hub's Pythia: fp16, bool mask; logits by transformers' own GPT-NeoX on the stored weights
    sd16 = pythia_state_dict(params, cfg, torch.float16, torch.bool)
    pythia = os.path.join(out_dir, "pythia")
    write_pythia(pythia, sd16, cfg)
    stored = {n: t.float() for n, t in sd16.items() if n in params}
    hf.load_state_dict({("lm_head.weight" if n == "embed_out.weight" else n): t for n, t in stored.items()},
                       strict=False)
    with torch.no_grad():
        logits = hf(tokens.long()).logits
    n_shards = write_sharded(os.path.join(out_dir, "pythia_sharded"), sd16, cfg)
    write_ref(os.path.join(out_dir, "pythia_sharded"), tokens, logits)

    # the same Pythia saved in fp32 by transformers 4.24, whose mask is uint8
    cfg32 = dict(cfg, torch_dtype="float32")
    pythia32 = os.path.join(out_dir, "pythia32")
    write_pythia(pythia32, pythia_state_dict(params, cfg32, torch.float32, torch.uint8), cfg32)

    # the reference's converter and model
    for name, src, kvL, kvH, kv_mlp in (("mlkv", pythia, 2, 2, False), ("kvmlp", pythia32, 2, 1, True)):
        d = os.path.join(out_dir, name)
        torch.manual_seed(1)  # its KV-MLP initialisation draws from torch's generator
        reference_convert(convert, src, d, kvL, kvH, kv_mlp)
        ref, conv_cfg, sd = reference_logits(pkg, d, tokens)
        floats = {n: t.float() for n, t in sd.items() if t.is_floating_point()}
        with torch.no_grad():
            independent = mlkv_forward(floats, dict(conv_cfg, mlkv_shared_key_rotary=False), tokens.long())
        diff = (ref - independent).abs().max().item()
        assert diff < 1e-4, f"{name}: the reference's model and mlkv_forward differ by {diff}"
        dtypes = collections.Counter(str(t.dtype).replace("torch.", "") for t in sd.values())
        print(f"{name}: convert_to_mlkv {kvL} layers x {kvH} heads{' KV-MLP' if kv_mlp else ''}; "
              f"{len(sd)} tensors {dict(dtypes)}; reference model vs mlkv_forward: max |diff| {diff:.2g}")
        write_ref(d, tokens, ref)
    extra = collections.OrderedDict(sd16)
    extra["gpt_neox.embed_in.position_ids"] = torch.arange(cfg["max_position_embeddings"]).view(1, -1)
    write_pythia(os.path.join(out_dir, "int64_extra"), extra, cfg)
    write_ref(pythia, tokens, logits)  # after converting: the converter copies every other file
    shutil.rmtree(pythia32)
    dtypes = collections.Counter(str(t.dtype).replace("torch.", "") for t in sd16.values())
    print(f"pythia: {len(sd16)} tensors {dict(dtypes)}; pythia_sharded: {n_shards} shards")
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out_dir) for f in fs)
    print(f"{out_dir}: {total} bytes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
