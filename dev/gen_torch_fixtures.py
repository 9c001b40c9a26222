"""pytorch_model.bin fixtures for test_mlkv.c, written by torch.save itself.

Run on a machine with torch, transformers and safetensors (the device machine),
after dev/gen_fixtures.py has made dev/fixtures:

    python3 dev/gen_torch_fixtures.py dev/fixtures

It writes DIR/reference_bin/:
  f32/, f16/, bf16/   the weights of DIR/mlkv_2x2_compat as a *reference
                      checkpoint*: pytorch_model.bin (torch.save of a state dict
                      whose embed_out.weight is a view at an offset into a larger
                      storage, and whose layer-0 query and key weights are two
                      views of one storage) and a config.json with
                      num_key_value_layers but no mlkv_shared_key_rotary, as the
                      reference code (github.com/zaydzuhri/pythia-mlkv) writes it.
                      ref.safetensors: tokens I32 [B, T] and logits F32 [B, T, V],
                      the reference's function (non-owning layers read the owner's
                      un-rotated keys) on the weights as stored, computed in fp32
                      by PyTorch.
  sharded/            f32 split over two files with pytorch_model.bin.index.json
  mha_hf/             DIR/mha as transformers saves it without safetensors
                      (stock fused query_key_value layout; transformers 5, which
                      writes only safetensors, gets torch.save of the same dict)
  hostile/            files that must be refused: a pickle naming os.system, a
                      REDUCE of a storage type, a storage shorter than its tensor,
                      a non-contiguous view, a compressed zip entry
"""
import collections
import io
import json
import os
import pickle
import shutil
import sys
import zipfile

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import mlkv_forward  # noqa: E402  (the independent MLKV statement)

B, T = 2, 8


def state_dict(P, dtype):
    """An OrderedDict like Module.state_dict(), with the two kinds of views."""
    sd = collections.OrderedDict((n, t.to(dtype).clone()) for n, t in P.items())
    head = sd["embed_out.weight"]
    big = torch.zeros(head.numel() + 37, dtype=dtype)
    big[37:] = head.flatten()
    sd["embed_out.weight"] = big[37:].view(head.shape)  # offset 37 into a larger storage
    q, k = "gpt_neox.layers.0.attention.query.weight", "gpt_neox.layers.0.attention.key.weight"
    both = torch.cat([sd[q].flatten(), sd[k].flatten()])
    sd[q] = both[: sd[q].numel()].view(sd[q].shape)      # two views of one storage
    sd[k] = both[sd[q].numel():].view(sd[k].shape)
    sd._metadata = collections.OrderedDict({"": {"version": 1}})  # as state_dict() has: pickled by BUILD
    return sd


def write_reference(d, cfg, P, dtype, tokens):
    os.makedirs(d, exist_ok=True)
    sd = state_dict(P, dtype)
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    stored = {n: t.float() for n, t in sd.items()}
    with torch.no_grad():
        logits = mlkv_forward(stored, cfg, tokens.long())
    save_file({"tokens": tokens, "logits": logits.contiguous()}, os.path.join(d, "ref.safetensors"))
    return stored


def zip_with(path, src, replace):
    """A copy of the torch.save zip src with some entries' bytes replaced."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new(data) if callable(new) else new
            zout.writestr(info.filename, data)


def main(out_dir):
    src = os.path.join(out_dir, "mlkv_2x2_compat")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    assert cfg.pop("mlkv_shared_key_rotary") is False  # the compat fixture is the reference's function
    P = load_file(os.path.join(src, "model.safetensors"))
    V = cfg["vocab_size"]
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7)).to(torch.int32)
    root = os.path.join(out_dir, "reference_bin")
    shutil.rmtree(root, ignore_errors=True)
    for name, dtype in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
        stored = write_reference(os.path.join(root, name), cfg, P, dtype, tokens)
        print(name, "max |stored - fp32|:", max((stored[n] - P[n]).abs().max().item() for n in P))

    # the same f32 weights over two shards, as sharded save_pretrained writes them
    d = os.path.join(root, "sharded")
    os.makedirs(d)
    names = list(P)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, part in shards.items():
        torch.save(collections.OrderedDict((n, P[n].clone()) for n in part), os.path.join(d, file))
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: file for file, part in shards.items() for n in part}}, f)
    shutil.copy(os.path.join(root, "f32", "config.json"), d)

    # the stock MHA fixture as transformers writes it without safetensors
    d = os.path.join(root, "mha_hf")
    from transformers import GPTNeoXForCausalLM
    mha = os.path.join(out_dir, "mha")
    model = GPTNeoXForCausalLM.from_pretrained(mha, torch_dtype=torch.float32)
    model.save_pretrained(d, safe_serialization=False)  # transformers 4 writes pytorch_model.bin
    how = "save_pretrained(safe_serialization=False)"
    if not os.path.exists(os.path.join(d, "pytorch_model.bin")):
        # transformers 5 writes safetensors whatever the option: write the checkpoint's tensors with
        # torch.save, as transformers 4 did (its shards were torch.save of a dict of tensors)
        os.remove(os.path.join(d, "model.safetensors"))
        torch.save(collections.OrderedDict(load_file(os.path.join(mha, "model.safetensors"))),
                   os.path.join(d, "pytorch_model.bin"))
        how = "torch.save of the checkpoint's tensors (this transformers writes only safetensors)"
    assert os.path.exists(os.path.join(d, "pytorch_model.bin")), os.listdir(d)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(d, extra)):
            os.remove(os.path.join(d, extra))
    got = torch.load(os.path.join(d, "pytorch_model.bin"), weights_only=True)
    want = load_file(os.path.join(mha, "model.safetensors"))
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    assert all(torch.equal(got[n], want[n]) for n in want)
    print("mha_hf:", how, sorted(os.listdir(d)))

    # files to refuse; each a small torch.save zip with one thing wrong
    d = os.path.join(root, "hostile")
    os.makedirs(d)
    base = os.path.join(d, "base.tmp")
    torch.save(collections.OrderedDict(w=torch.arange(6, dtype=torch.float32).view(2, 3)), base)
    system = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    zip_with(os.path.join(d, "global_os_system.bin"), base, {"/data.pkl": system})
    storage_call = b"\x80\x02ctorch\nFloatStorage\nq\x00)Rq\x01."
    zip_with(os.path.join(d, "reduce_storage.bin"), base, {"/data.pkl": storage_call})
    zip_with(os.path.join(d, "short_storage.bin"), base, {"/data/0": lambda b: b[:12]})
    torch.save(collections.OrderedDict(w=torch.arange(6, dtype=torch.float32).view(2, 3).t()),
               os.path.join(d, "non_contiguous.bin"))
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(os.path.join(d, "compressed.bin"), "w",
                                                       zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    os.remove(base)
    # the same pickles must be refused by Python's own safe loader too, or they are not hostile
    for f in sorted(os.listdir(d)):
        try:
            torch.load(os.path.join(d, f), weights_only=True)
            print("hostile/" + f, "loads in torch.load(weights_only=True)")
        except Exception as e:  # noqa: BLE001
            print("hostile/" + f, "refused by torch.load(weights_only=True):", type(e).__name__)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(root) for f in fs)
    print("reference_bin:", total, "bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dev/fixtures")
