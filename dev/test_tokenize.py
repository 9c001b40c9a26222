"""Tests of tokenize.py (run by make test from the repository root):
    python3 dev/test_tokenize.py
Expected ids and texts come from HF tokenizers (dev/gen_tokenizer_fixtures.py)."""
import importlib.util
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "dev", "fixtures", "tokenizer")
PYTHIA = os.path.join(FIXTURES, "pythia-tokenizer.json")
passed = failed = 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print("FAIL", what)


def load_module():
    """tokenize.py under another name, so the standard library's tokenize stays itself."""
    spec = importlib.util.spec_from_file_location("mlkv_tokenize", os.path.join(ROOT, "tokenize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool(*args, stdin=None, cwd=ROOT):
    return subprocess.run([sys.executable, "tokenize.py", *args], cwd=cwd, input=stdin, capture_output=True)


def read_tokens(path):
    with open(path, "rb") as f:
        data = f.read()
    magic, version, count = struct.unpack("<3i", data[:12])
    check(magic == 20240520 and version == 1 and len(data) == 1024 + 2 * count, f"{path}: llm.c header")
    return list(struct.unpack(f"<{count}H", data[1024:]))


def test_fixtures(tk):
    expected = json.load(open(os.path.join(FIXTURES, "expected.json"), encoding="utf-8"))
    for name, data in expected.items():
        tok = tk.Tokenizer(os.path.join(FIXTURES, name))
        enc = sum(tok.encode(c["text"]) == c["ids"] for c in data["cases"])
        dec = sum(tok.decode(c["ids"]) == c["decoded"] for c in data["cases"] + data["partial"])
        for c in data["cases"]:
            check(tok.encode(c["text"]) == c["ids"], f"{name}: encode {c['text'][:40]!r}")
            check(tok.decode(c["ids"]) == c["decoded"], f"{name}: decode {c['ids'][:10]}")
        for c in data["partial"]:
            check(tok.decode(c["ids"]) == c["decoded"], f"{name}: decode a cut character {c['ids']}")
        print(f"  {name}: {enc} of {len(data['cases'])} encodings and {dec} of "
              f"{len(data['cases']) + len(data['partial'])} decodings equal HF tokenizers")


def test_command_line():
    r = tool("encode", "--tokenizer", PYTHIA, "Hello  world<|endoftext|>")
    check(r.returncode == 0 and r.stdout == b"12092 50276 10186 0\n", f"encode: {r.stdout} {r.stderr}")
    r = tool("encode", "--tokenizer", PYTHIA, stdin="日本語 😀".encode())
    ids = r.stdout.split()
    r2 = tool("decode", "--tokenizer", PYTHIA, *[i.decode() for i in ids])
    check(r.returncode == 0 and r2.stdout.decode() == "日本語 😀", f"stdin round trip: {r2.stdout} {r2.stderr}")
    r = tool("decode", "--tokenizer", PYTHIA, stdin=b"12092 50276\n10186")
    check(r.stdout == b"Hello  world", f"decode from stdin: {r.stdout}")
    r = tool("decode", "--tokenizer", PYTHIA, "99999")
    check(r.returncode == 1 and b"token id 99999 is not in the vocabulary" in r.stderr, f"bad id: {r.stderr}")
    r = tool("encode", "--tokenizer", "/nonexistent/tokenizer.json", "x")
    check(r.returncode == 1 and b"/nonexistent/tokenizer.json" in r.stderr and b"Traceback" not in r.stderr,
          f"missing file: {r.stderr}")
    for command in ("encode", "decode", "shards", "bytes", "tasks"):
        r = tool(command, "--help")
        check(r.returncode == 0 and b"--" in r.stdout, f"{command} --help")


def test_standard_tokenize_survives():
    # run from this folder: tracebacks must still show source lines (linecache uses the
    # standard tokenize module), and code that imports tokenize must get the standard one
    r = tool("--debug", "encode", "--tokenizer", "/nonexistent/tokenizer.json", "x")
    check(b"Traceback" in r.stderr and b'raise TokenizerError(f"{path}: {e}") from e' in r.stderr,
          f"a traceback with its source lines: {r.stderr.decode()[-400:]}")
    code = "import inspect, tokenize, linecache; assert hasattr(tokenize, 'generate_tokens'); " \
           "print(len(inspect.getsource(linecache.getline)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    check(r.returncode == 0 and int(r.stdout) > 0, f"import tokenize from the repository root: {r.stderr}")


def test_shards(tk):
    tok = tk.Tokenizer(PYTHIA)
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "in", "sub"))
        docs = []
        sep = "\n=====\n"

        def write(path, text):
            with open(os.path.join(d, "in", path), "w", encoding="utf-8") as f:
                f.write(text)
        write("a.txt", "The first document.\nIt has two lines. Ünïcödé too.")
        write("b.txt", sep.join(["second doc", "third doc with   spaces", "fourth <|endoftext|> inside"]))
        write("c.jsonl", "\n".join(json.dumps({"text": t}) for t in ["fifth", "sixth 日本", "seventh 😀"]) + "\n")
        write("sub/d.txt", "eighth, in a subfolder")
        docs = ["The first document.\nIt has two lines. Ünïcödé too.", "second doc", "third doc with   spaces",
                "fourth <|endoftext|> inside", "fifth", "sixth 日本", "seventh 😀", "eighth, in a subfolder"]
        out = os.path.join(d, "out")
        args = ["shards", "--tokenizer", PYTHIA, "--out", out, "--separator", sep, "--val-fraction", "0.4",
                "--workers", "2", os.path.join(d, "in")]
        r = tool(*args)
        check(r.returncode == 0 and b"train.bin" in r.stdout and b"MB/s" in r.stderr, f"shards: {r.stderr}")
        train, val = read_tokens(os.path.join(out, "train.bin")), read_tokens(os.path.join(out, "val.bin"))
        want = {"train": [], "val": []}
        for t in docs:  # files in sorted order, documents in file order, <|endoftext|> after each
            part = "val" if zlib.crc32(t.encode()) < int(0.4 * 2 ** 32) else "train"
            want[part] += tok.encode(t) + [0]
        check(train == want["train"] and val == want["val"] and val, "shard contents and the split by text")
        first = open(os.path.join(out, "train.bin"), "rb").read()
        tool(*args)
        check(open(os.path.join(out, "train.bin"), "rb").read() == first, "shards are deterministic")
        r = tool("shards", "--tokenizer", PYTHIA, "--out", out, "--max-doc-tokens", "3", "--val-fraction", "0",
                 "--workers", "1", os.path.join(d, "in", "a.txt"))
        check(read_tokens(os.path.join(out, "train.bin")) == tok.encode(docs[0])[:3] + [0], "--max-doc-tokens")
        write("bad.jsonl", '{"text": "ok"}\n{"txt": "no"}\n')
        r = tool("shards", "--tokenizer", PYTHIA, "--out", out, os.path.join(d, "in", "bad.jsonl"))
        check(r.returncode == 1 and b'bad.jsonl:2: not a JSON object with a "text" field' in r.stderr,
              f"bad jsonl: {r.stderr}")
        write("x.csv", "a,b")
        r = tool("shards", "--tokenizer", PYTHIA, "--out", out, os.path.join(d, "in", "x.csv"))
        check(r.returncode == 1 and b"not a .txt or .jsonl file" in r.stderr, f"bad input: {r.stderr}")
        big = json.load(open(PYTHIA, encoding="utf-8"))
        big["added_tokens"].append({"id": 70000, "content": "<|big|>", "special": True, "normalized": False})
        with open(os.path.join(d, "big.json"), "w", encoding="utf-8") as f:
            json.dump(big, f)
        r = tool("shards", "--tokenizer", os.path.join(d, "big.json"), "--out", out, os.path.join(d, "in", "a.txt"))
        check(r.returncode == 1 and b"70001 tokens do not fit the uint16" in r.stderr, f"big vocabulary: {r.stderr}")
        # --separator as typed in a shell: '\n\n' means two newlines; a file without it warns, as does an empty val.bin
        write("paras.txt", "first paragraph\n\nsecond paragraph\n\nthird")
        write("flat.txt", "no blank lines here")
        r = tool("shards", "--tokenizer", PYTHIA, "--out", out, "--separator", "\\n\\n", "--val-fraction", "0.001",
                 "--workers", "1", os.path.join(d, "in", "paras.txt"), os.path.join(d, "in", "flat.txt"))
        check(r.returncode == 0 and b"train.bin" in r.stdout and b"from 4 documents" in r.stdout,
              f"separator escapes: {r.stdout} {r.stderr}")
        check(b"flat.txt: the separator '\\n\\n' does not occur: the file is one document" in r.stderr and
              b"val.bin is empty" in r.stderr, f"warnings: {r.stderr}")
        check(b"eta -" not in r.stderr.replace(b"eta    -", b"") and b"eta -0s" not in r.stderr,
              f"no negative or early estimate: {r.stderr}")
        r = tool("bytes", "--out", os.path.join(d, "bytes.json"))
        check(r.returncode == 0 and json.load(open(os.path.join(d, "bytes.json"), encoding="utf-8")) ==
              json.load(open(os.path.join(FIXTURES, "bytes-tokenizer.json"), encoding="utf-8")),
              "bytes writes the tokenizer the fixtures were made from")


# Rows of each task in the layouts the authors and the hub publish, and the
# request lm-evaluation-harness's template makes of each, written out by hand.
TASK_ROWS = {
    "arc_easy": (
        [{"id": "1", "question": "What is H2O?", "choices": {"text": ["water", "salt"], "label": ["A", "B"]},
          "answerKey": "A"},
         {"id": "2", "question": {"stem": "Pick a planet", "choices": [{"text": "Mars", "label": "1"},
                                                                       {"text": "Moon", "label": "2"}]},
          "answerKey": "1"}],
        None,
        [("Question: What is H2O?\nAnswer:", ["water", "salt"], 0),
         ("Question: Pick a planet\nAnswer:", ["Mars", "Moon"], 0)]),
    "sciq": (
        [{"question": "What boils?", "distractor1": "ice", "distractor2": "rock", "distractor3": "sand",
          "correct_answer": "water", "support": "\n  Heat makes water boil. "}],
        None,
        [("Heat makes water boil. \nQuestion: What boils?\nAnswer:", ["ice", "rock", "sand", "water"], 3)]),
    "piqa": (
        [{"goal": "Cut bread", "sol1": "use a knife", "sol2": "use a spoon"},
         {"goal": "Boil an egg", "sol1": "put it in cold oil", "sol2": "put it in boiling water", "label": 1}],
        "0\n1\n",
        [("Question: Cut bread\nAnswer:", ["use a knife", "use a spoon"], 0),
         ("Question: Boil an egg\nAnswer:", ["put it in cold oil", "put it in boiling water"], 1)]),
    "boolq": (  # Google's original dev.jsonl (title apart), then SuperGLUE's val.jsonl (title in the passage)
        [{"question": "is ice cold", "title": "Ice", "answer": True, "passage": "Ice is frozen water."},
         {"question": "is fire wet", "passage": "Fire -- Fire is hot.", "idx": 3, "label": 0}],
        None,
        [("Ice -- Ice is frozen water.\nQuestion: is ice cold?\nAnswer:", ["no", "yes"], 1),
         ("Fire -- Fire is hot.\nQuestion: is fire wet?\nAnswer:", ["no", "yes"], 0)]),
    "lambada_openai": (
        [{"text": "She poured the tea into her favourite cup"}, {"text": "Done"}],
        None,
        [("She poured the tea into her favourite", [" cup"], 0), ("", [" Done"], 0)]),
}


def test_tasks(tk):
    tok = tk.Tokenizer(PYTHIA)
    with tempfile.TemporaryDirectory() as d:
        for task, (rows, labels, want) in TASK_ROWS.items():
            raw, out = os.path.join(d, task + ".jsonl"), os.path.join(d, task + ".task.jsonl")
            with open(raw, "w", encoding="utf-8") as f:
                if task == "sciq":  # the original SciQ is one JSON array
                    json.dump(rows, f)
                else:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
            args = ["tasks", "--tokenizer", PYTHIA, "--task", task, "--input", raw, "--out", out]
            if labels:
                with open(os.path.join(d, "labels.lst"), "w") as f:
                    f.write(labels)
                args += ["--labels", os.path.join(d, "labels.lst")]
            r = tool(*args)
            check(r.returncode == 0, f"tasks {task}: {r.stderr}")
            got = [json.loads(line) for line in open(out, encoding="utf-8")]
            check([(g["context"], g["choices"], g["gold"]) for g in got] == want,
                  f"{task}: the harness's template: {[(g['context'], g['choices'], g['gold']) for g in got]}")
            delimiter = "" if task == "lambada_openai" else " "
            check(all(g["target_delimiter"] == delimiter for g in got), f"{task}: the delimiter is written")
            for g in got:  # _encode_pair: context ids, then the rest of the whole string's ids
                ctx = g["context"]
                for choice, cont_ids in zip(g["choices"], g["continuation_ids"]):
                    whole = ctx + delimiter + choice
                    if ctx:
                        check(g["context_ids"] + cont_ids == tok.encode(whole) and
                              g["context_ids"] == tok.encode(ctx.rstrip()), f"{task}: ids of {whole!r}")
                    else:
                        check(g["context_ids"] == [0] and cont_ids == tok.encode(whole), f"{task}: empty context")
        # the context's trailing spaces move into the continuation
        ctx_ids, cont_ids = tk.encode_pair(tok, "Answer: ", "yes")
        check(ctx_ids == tok.encode("Answer:") and cont_ids == tok.encode("Answer: yes")[len(ctx_ids):],
              "trailing spaces move to the continuation")
        bad = os.path.join(d, "bad.jsonl")
        with open(bad, "w") as f:
            f.write('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{"goal": "x"\n')
        r = tool("tasks", "--tokenizer", PYTHIA, "--task", "piqa", "--input", bad, "--out", os.path.join(d, "o"))
        check(r.returncode == 1 and b"bad.jsonl:2: not a JSON object" in r.stderr, f"bad line: {r.stderr}")
        with open(bad, "w") as f:
            f.write('{"goal": "a", "sol1": "b"}\n')
        r = tool("tasks", "--tokenizer", PYTHIA, "--task", "piqa", "--input", bad, "--out", os.path.join(d, "o"))
        check(r.returncode == 1 and b"document 1 lacks what piqa needs" in r.stderr, f"missing field: {r.stderr}")
        with open(bad, "w") as f:  # the hub's google/boolq: the passages' titles are lost
            f.write('{"question": "is ice cold", "answer": true, "passage": "Ice is frozen water."}\n')
        r = tool("tasks", "--tokenizer", PYTHIA, "--task", "boolq", "--input", bad, "--out", os.path.join(d, "o"))
        check(r.returncode == 1 and b"bad.jsonl: document 1: a passage without its title" in r.stderr and
              b"use SuperGLUE's val.jsonl" in r.stderr and not os.path.exists(os.path.join(d, "o")),
              f"google/boolq is refused: {r.stderr}")
        r = tool("tasks", "--tokenizer", PYTHIA, "--task", "boolq", "--input", bad, "--out", bad)
        check(r.returncode == 1 and b"is also the input" in r.stderr and os.path.getsize(bad) > 0,
              f"the input is never the output: {r.stderr}")
        with open(os.path.join(d, "two.lst"), "w") as f:
            f.write("0\n1\n")
        r = tool("tasks", "--tokenizer", PYTHIA, "--task", "piqa", "--input", bad, "--labels",
                 os.path.join(d, "two.lst"), "--out", os.path.join(d, "o"))
        check(r.returncode == 1 and b"two.lst: 2 labels for 1 documents" in r.stderr, f"labels: {r.stderr}")


def test_text_tasks(tk):
    """A task of one's own: text lines, the defaults filled in, the ids of encode_pair."""
    tok = tk.Tokenizer(PYTHIA)
    with tempfile.TemporaryDirectory() as d:
        mine, out = os.path.join(d, "capitals.jsonl"), os.path.join(d, "out.jsonl")
        rows = [{"context": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "Rome"],
                 "gold": 0},
                {"context": "The capital of Italy is ", "choices": ["Rome", "Oslo", "Bern"], "gold": 0,
                 "metrics": ["acc"]}]
        with open(mine, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        r = tool("tasks", "--tokenizer", PYTHIA, "--input", mine, "--out", out)
        check(r.returncode == 0 and b"2 capitals documents (multiple_choice)" in r.stdout, f"text task: {r.stderr}")
        got = [json.loads(line) for line in open(out, encoding="utf-8")]
        check([(g["task"], g["kind"], g["metrics"], g["target_delimiter"], g["gold"]) for g in got] ==
              [("capitals", "multiple_choice", ["acc", "acc_norm"], " ", 0),
               ("capitals", "multiple_choice", ["acc"], " ", 0)], f"defaults: {got}")
        for row, g in zip(rows, got):
            pairs = [tk.encode_pair(tok, row["context"], " " + c) for c in row["choices"]]
            check(g["context_ids"] == pairs[0][0] and g["continuation_ids"] == [p[1] for p in pairs],
                  f"ids of {row['context']!r}")
        check(got[1]["context_ids"] == tok.encode("The capital of Italy is") and
              got[1]["continuation_ids"][0] == tok.encode("The capital of Italy is  Rome")[len(got[1]["context_ids"]):],
              "the context's trailing space joins the delimiter")
        # one choice: a loglikelihood task (LAMBADA's kind); the name from "task"
        with open(mine, "w", encoding="utf-8") as f:
            f.write(json.dumps({"task": "last_word", "context": "She poured the tea into her", "choices": ["cup"]}))
        r = tool("tasks", "--tokenizer", PYTHIA, "--input", mine, "--out", out)
        g = json.loads(open(out, encoding="utf-8").readline())
        check(r.returncode == 0 and (g["task"], g["kind"], g["metrics"], g["gold"]) ==
              ("last_word", "loglikelihood", ["perplexity", "acc"], 0) and
              g["continuation_ids"] == [tok.encode("She poured the tea into her cup")[-1:]], f"one choice: {g}")
        for line, message in (('{"context": "a", "choices": ["b", "c"]}', b'"gold" must be the index of a choice'),
                              ('{"context": "a", "choices": []}', b'"choices" must list 1 to 64 strings'),
                              ('{"choices": ["b"]}', b'"context" must be a string'),
                              ('{"context": "a", "choices": ["b", "c"], "gold": 2}', b'"gold" must be the index'),
                              ('{"context": "a", "choices": ["b", "c"], "gold": 0, "kind": "loglikelihood"}',
                               b'loglikelihood with exactly one choice'),
                              ('{"context": "a", "choices": ["b", "c"], "gold": 0}\n{"context": "a", "choices": ["b"]}',
                               b"document 2 is 'capitals' (loglikelihood), the file's first is 'capitals' "
                               b"(multiple_choice)")):
            with open(mine, "w", encoding="utf-8") as f:
                f.write(line + "\n")
            r = tool("tasks", "--tokenizer", PYTHIA, "--input", mine, "--out", out)
            check(r.returncode == 1 and b"capitals.jsonl: document" in r.stderr and message in r.stderr and
                  b"Traceback" not in r.stderr, f"{line}: {r.stderr}")


def main():
    tk = load_module()
    print("tokenize.py:")
    test_fixtures(tk)
    test_command_line()
    test_standard_tokenize_survives()
    test_shards(tk)
    test_tasks(tk)
    test_text_tasks(tk)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
