"""Reference results for `mlkv eval` (test_mlkv.c), computed with HF transformers.

Run on the device machine (torch, transformers, tokenizers) from the repository root:

    python3 dev/gen_eval_fixtures.py dev/fixtures/eval

It writes DIR/:
  model/            a tiny GPT-NeoX (vocab 320, window 64, random weights large enough
                    that choices are far apart), saved by save_pretrained, and the
                    byte-level tokenizer.json of dev/fixtures/tokenizer
  raw/              hand-written rows of the five tasks in their published layouts
                    (hub and original; non-ASCII text, multi-token choices, a context
                    longer than the window, a lambada word the model predicts greedily)
  tasks/            the task files `python3 tokenize.py tasks` makes of them
  text/             two tasks of one's own, text alone ({"context", "choices", "gold"}:
                    several choices, then one choice each), which mlkv eval tokenizes
                    itself; scored here through the ids `python3 tokenize.py tasks`
                    gives them (checked against HF tokenizers, as the others)
  expected.json     per task: every continuation's loglikelihood and greedy flag, and
                    every metric with its standard error, computed here as
                    lm-evaluation-harness computes them: _encode_pair (checked against
                    HF tokenizers), the window cut of _loglikelihood_tokens, log_softmax
                    of the HF model's logits, and the harness's aggregations (mean,
                    sample stddev / sqrt(n), exp(-mean), bootstrap_stderr with
                    random.Random(i).choices in chunks of 1000 of 100000 iterations).
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "dev", "fixtures", "tokenizer", "bytes-tokenizer.json")
EOT = 256
WINDOW = 64
BOOTSTRAP_ITERS = 100000

LONG_SUPPORT = ("Ice that is heated melts into water, and water that is heated boils into steam; "
                "each change of state takes energy, called latent heat, without raising the temperature.")
RAW = {
    "arc_easy.jsonl": [  # the hub's layout, then AI2's original one
        {"id": "A1", "question": "Which gas do plants take in for photosynthesis?",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
        {"id": "A2", "question": {"stem": "Welche Einheit misst die Temperatur — °C oder kg?",
                                  "choices": [{"text": "°C", "label": "1"}, {"text": "kg", "label": "2"},
                                              {"text": "m/s", "label": "3"}]}, "answerKey": "1"},
        {"id": "A3", "question": "What do bees make?",
         "choices": {"text": ["honey", "milk", "silk"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    ],
    "sciq.json": [  # the original layout: a JSON array
        {"question": "What does heat turn ice into?", "distractor1": "salt", "distractor2": "glass",
         "distractor3": "sand", "correct_answer": "water", "support": "  " + LONG_SUPPORT},
        {"question": "Which organ pumps blood?", "distractor1": "lung", "distractor2": "skin",
         "distractor3": "bone", "correct_answer": "heart", "support": ""},
    ],
    "piqa.jsonl": [  # the original layout: labels in piqa-labels.lst
        {"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "freeze the jar for a week."},
        {"goal": "Dry wet shoes", "sol1": "stuff them with newspaper", "sol2": "fill them with water"},
    ],
    "boolq.jsonl": [  # Google's original dev.jsonl (title apart, answer), then SuperGLUE's (label)
        {"question": "is the sun a star", "passage": "The Sun is the star at the center of the Solar System.",
         "answer": True, "title": "Sun"},
        {"question": "is água wet", "passage": "Água é a palavra portuguesa para water.", "idx": 1, "label": 0},
    ],
}
PIQA_LABELS = "0\n0\n"
TASK_OF = {"arc_easy.jsonl": "arc_easy", "sciq.json": "sciq", "piqa.jsonl": "piqa", "boolq.jsonl": "boolq",
           "lambada.jsonl": "lambada_openai"}
# tasks of one's own, in ASCII (mlkv tokenizes ASCII itself): the context's trailing space, an empty
# context, a multi-token choice; then one-choice documents (lambada's kind), one predicted greedily
TEXT = {
    "own_choice.jsonl": [
        {"context": "Question: Which gas do plants take in?\nAnswer:", "choices": ["oxygen", "carbon dioxide", "helium"],
         "gold": 1},
        {"context": "The cat sat on the ", "choices": ["mat", "moon"], "gold": 0},
        {"context": "", "choices": ["Hello there", "Goodbye"], "gold": 1},
    ],
    "own_word.jsonl": [
        {"context": "She poured the tea into her favourite", "choices": ["cup"]},
        {"context": "the cat sat on the", "choices": ["mat"]},
        {"context": "Numbers: 1 2 3", "choices": ["4"], "target_delimiter": " "},
    ],
}


def make_model(seed):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=WINDOW, rotary_pct=0.25,
                        partial_rotary_factor=0.25, rotary_emb_base=10000, rope_theta=10000,
                        use_parallel_residual=True, tie_word_embeddings=False, initializer_range=0.3,
                        eos_token_id=EOT, bos_token_id=EOT)
    cfg._attn_implementation = "eager"
    model = GPTNeoXForCausalLM(cfg).float().eval()
    with torch.no_grad():  # random LayerNorms and biases too: nothing in the function is trivial
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if n.endswith("weight") and "norm" in n else 0.0) + 0.2 * torch.randn_like(p))
    return model


def encode_pair(tok, context, continuation):
    """lm-evaluation-harness's _encode_pair, on HF tokenizers."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        return [EOT], tok.encode(continuation).ids
    whole, ids = tok.encode(context + continuation).ids, tok.encode(context).ids
    return ids, whole[len(ids):]


def loglikelihood(model, ctx, cont):
    """The harness's _loglikelihood_tokens for one request: (sum logprob, greedy, margin)."""
    inp = (ctx + cont)[-(WINDOW + 1):][:-1]
    with torch.no_grad():
        logits = F.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)
    logits = logits[len(inp) - len(cont):]
    target = torch.tensor(cont)
    greedy = bool((logits.argmax(-1) == target).all())
    chosen = logits.gather(1, target[:, None])[:, 0]
    others = logits.scatter(1, target[:, None], -math.inf).max(-1).values
    margin = (chosen - others).abs().min().item()  # how far each greedy decision is from a tie
    return float(logits.gather(1, target[:, None]).sum()), greedy, margin


def make_greedy(model, context, word):
    """Adjusts the head's rows of the target's tokens until greedy decoding after
    context produces " " + word (a random model never would), so that lambada's
    acc and greedy flags are tested on a true case too."""
    ids, head = list(context.encode()), model.get_output_embeddings().weight
    targets = list((" " + word).encode())
    for _ in range(20):
        done = True
        for k, want in enumerate(targets):
            with torch.no_grad():
                h = model.gpt_neox(torch.tensor([ids + targets[:k]])).last_hidden_state[0, -1]
                z = head @ h
                best = z.clone()
                best[want] = -math.inf
                if z[want] - best.max() < 0.5:  # raise the wanted row along h, past the best other one
                    head[want] += (best.max() - z[want] + 1.0) * h / h.dot(h)
                    done = False
        if done:
            return context + " " + word
    raise SystemExit("could not make the lambada word greedy")


def bootstrap_stderr(f, xs, iters):
    """The harness's bootstrap_stderr: chunk i of min(1000, iters) resamples from random.Random(i)."""
    chunk = min(1000, iters)
    res = []
    for i in range(iters // chunk):
        rnd = random.Random(i)
        res.extend(f(rnd.choices(xs, k=len(xs))) for _ in range(chunk))
    return sample_stddev(res)


def mean(xs):
    return sum(xs) / len(xs)


def sample_stddev(xs):
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def perplexity(lls):
    return math.exp(-mean(lls))


def main(out):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(TOKENIZER)
    shutil.rmtree(out, ignore_errors=True)
    for d in ("model", "raw", "tasks", "text"):
        os.makedirs(os.path.join(out, d))
    for seed in range(100):  # a model whose choices and argmaxes are far from ties
        model = make_model(seed)
        rows = dict(RAW)
        rows["lambada.jsonl"] = [{"text": "The café on the corner sells fresh bread"},
                                 {"text": make_greedy(model, "the cat sat on the", "mat")}, {"text": "Tiny"}]
        for name, docs in rows.items():
            with open(os.path.join(out, "raw", name), "w", encoding="utf-8") as f:
                if name.endswith(".json"):
                    json.dump(docs, f, ensure_ascii=False, indent=1)
                else:
                    f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
        with open(os.path.join(out, "raw", "piqa-labels.lst"), "w") as f:
            f.write(PIQA_LABELS)
        for name, docs in TEXT.items():
            with open(os.path.join(out, "text", name), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(d) + "\n" for d in docs)
        expected, worst_gap, worst_margin = {}, math.inf, math.inf
        for name, task in list(TASK_OF.items()) + [(name, None) for name in TEXT]:
            if task:
                path = os.path.join(out, "tasks", task + ".jsonl")
                cmd = [sys.executable, "tokenize.py", "tasks", "--tokenizer", TOKENIZER, "--task", task,
                       "--input", os.path.join(out, "raw", name), "--out", path]
            else:  # a task of one's own: named after its file
                task, path = name[:-len(".jsonl")], os.path.join(out, "text-ids.tmp")
                cmd = [sys.executable, "tokenize.py", "tasks", "--tokenizer", TOKENIZER,
                       "--input", os.path.join(out, "text", name), "--out", path]
            if task == "piqa":
                cmd += ["--labels", os.path.join(out, "raw", "piqa-labels.lst")]
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
            docs = [json.loads(line) for line in open(path, encoding="utf-8")]
            if path.endswith(".tmp"):
                os.remove(path)
            lls, greedy, acc, acc_norm, target = [], [], [], [], []
            for doc in docs:
                delim = doc["target_delimiter"]
                doc_ll = []
                for i, choice in enumerate(doc["choices"]):
                    ctx, cont = encode_pair(tok, doc["context"], delim + choice)
                    assert ctx == doc["context_ids"] and cont == doc["continuation_ids"][i], (task, doc["doc"], i)
                    ll, g, margin = loglikelihood(model, ctx, cont)
                    doc_ll.append(ll)
                    lls.append(ll)
                    greedy.append(g)
                    worst_margin = min(worst_margin, margin)
                norm = [ll / len(c) for ll, c in zip(doc_ll, doc["choices"])]
                for xs in (doc_ll, norm):  # the argmax must not hang on rounding
                    s = sorted(xs, reverse=True)
                    if len(s) > 1:
                        worst_gap = min(worst_gap, (s[0] - s[1]) / abs(s[0]))
                acc.append(float(greedy[-1]) if doc["kind"] == "loglikelihood" else
                           float(max(range(len(doc_ll)), key=lambda i: (doc_ll[i], -i)) == doc["gold"]))
                acc_norm.append(float(max(range(len(norm)), key=lambda i: (norm[i], -i)) == doc["gold"]))
                target.append(doc_ll[doc["gold"]])
            metrics = {}
            if doc["kind"] == "loglikelihood":
                metrics["perplexity"] = [perplexity(target), bootstrap_stderr(perplexity, target, BOOTSTRAP_ITERS)]
            metrics["acc"] = [mean(acc), sample_stddev(acc) / math.sqrt(len(acc))]
            if "acc_norm" in doc["metrics"]:
                metrics["acc_norm"] = [mean(acc_norm), sample_stddev(acc_norm) / math.sqrt(len(acc_norm))]
            expected[task] = {"loglikelihoods": lls, "greedy": greedy, "metrics": metrics}
        if worst_gap > 1e-3 and worst_margin > 1e-3:
            break
        print(f"seed {seed}: choices {worst_gap:.2g} or argmaxes {worst_margin:.2g} too close, next seed")
    model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(out, "model", extra)):
            os.remove(os.path.join(out, "model", extra))
    shutil.copy(TOKENIZER, os.path.join(out, "model", "tokenizer.json"))
    try:  # the harness's own aggregation functions, where it is installed
        from lm_eval.api import metrics as harness
        for task, e in expected.items():
            accs = [float(x) for x in e["greedy"]] if task == "lambada_openai" else None
            if accs:
                assert abs(harness.mean_stderr(accs) - e["metrics"]["acc"][1]) < 1e-12
        print("lm_eval's mean_stderr agrees")
    except ImportError:
        print("lm_eval is not installed here: its formulas are restated above")
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"seed": seed, "closest_choices": worst_gap, "closest_argmax": worst_margin,
                   "tasks": expected}, f, indent=1)
    for task, e in expected.items():
        print(task, {k: [round(v, 6) for v in x] for k, x in e["metrics"].items()},
              "greedy", sum(e["greedy"]), "of", len(e["greedy"]))
    print("seed", seed, "closest choices", worst_gap, "closest argmax", worst_margin)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dev/fixtures/eval")
