"""tokenize.py - Pythia's tokenizer in the Python 3 standard library alone.

    python3 tokenize.py encode --tokenizer tokenizer.json [TEXT]     ids (stdin without TEXT)
    python3 tokenize.py decode --tokenizer tokenizer.json [IDS...]   text (stdin without IDS)
    python3 tokenize.py shards --tokenizer tokenizer.json --out DIR INPUTS...
    python3 tokenize.py bytes --out tokenizer.json                   a byte-level tokenizer
    python3 tokenize.py tasks --tokenizer tokenizer.json --task arc_easy --input RAW --out TASK.jsonl
    python3 tokenize.py tasks --tokenizer tokenizer.json --input MY_TASK.jsonl --out TASK.jsonl

It reads any Hugging Face tokenizer.json of the GPT-2 / GPT-NeoX family
(byte-level BPE) and encodes exactly as the `tokenizers` library: added tokens
first (special ones on the raw text, the others after normalization), NFC, the
GPT-2 split pattern with Unicode letters, numbers and white space, then BPE
merges by rank. --help on every command.
"""

# This file shares its name with the standard library's tokenize module, which
# linecache (tracebacks) and inspect import. Python puts this folder first on
# sys.path when it runs a script from here, so `import tokenize` anywhere in the
# process would load this file instead. When that happens, load the real module
# in its place: the importer then hands the standard one to whoever asked.
if __name__ == "tokenize":
    import importlib.machinery
    import importlib.util
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("tokenize", _path)
    _real = importlib.util.module_from_spec(_spec)
    _sys.modules["tokenize"] = _real
    _spec.loader.exec_module(_real)

import argparse
import json
import multiprocessing
import os
import re
import sys
import time
import unicodedata
import zlib

TOKENS_MAGIC, TOKENS_VERSION = 20240520, 1  # llm.c's token files


def byte_alphabet():
    """Byte-level BPE spells each byte as a printable character: printable
    Latin-1 bytes stand for themselves, the other 68 bytes take the code points
    from 256 up, in byte order. Returns {byte: char}."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# Unicode White_Space, as the regex engine of `tokenizers` (Oniguruma) reads \s.
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
               (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]


def char_class(ranges):
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


def category_ranges(first_letter):
    """Code point ranges whose general category starts with first_letter (L, N)."""
    ranges, start = [], None
    for cp in range(0x110000):
        if unicodedata.category(chr(cp))[0] == first_letter:
            if start is None:
                start = cp
        elif start is not None:
            ranges.append((start, cp - 1))
            start = None
    if start is not None:
        ranges.append((start, 0x10FFFF))
    return ranges


def split_pattern():
    """GPT-2's pre-tokenizer pattern
        's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    with \\p{L}, \\p{N} and \\s spelled out as classes, since `re` lacks them."""
    L, N, S = char_class(category_ranges("L")), char_class(category_ranges("N")), char_class(WHITE_SPACE)
    return re.compile(f"'(?:s|t|re|ve|m|ll|d)| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


class TokenizerError(Exception):
    pass


class Tokenizer:
    def __init__(self, path):
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path}: {e}") from e
        model = spec.get("model") or {}
        if model.get("type") not in ("BPE", None) or not isinstance(model.get("vocab"), dict):
            raise TokenizerError(f"{path}: not a BPE tokenizer.json (model.type {model.get('type')!r})")
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel":
            raise TokenizerError(f"{path}: pre_tokenizer {pre.get('type')!r} is not ByteLevel")
        self.add_prefix_space = bool(pre.get("add_prefix_space", False))
        norm = spec.get("normalizer") or {}
        if norm.get("type") not in (None, "NFC"):
            raise TokenizerError(f"{path}: normalizer {norm.get('type')!r} is not supported (NFC or none)")
        self.nfc = norm.get("type") == "NFC"
        self.vocab = model["vocab"]
        self.ranks = {}
        for rank, merge in enumerate(model.get("merges", [])):
            pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
            if len(pair) != 2:
                raise TokenizerError(f"{path}: merge {rank} is not a pair: {merge!r}")
            self.ranks.setdefault(pair, rank)
        self.added = {t["content"]: t for t in spec.get("added_tokens", [])}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        for t in spec.get("added_tokens", []):
            self.id_to_token[t["id"]] = t["content"]
        self.vocab_size = max(self.id_to_token) + 1
        self.to_char = byte_alphabet()
        self.to_byte = {c: b for b, c in self.to_char.items()}
        # added tokens are found longest-first at the leftmost position, the
        # special ones (normalized false) in the raw text, the others after NFC
        raw = [c for c, t in self.added.items() if not t.get("normalized", True)]
        normed = [c for c, t in self.added.items() if t.get("normalized", True)]
        self.raw_added = self.alternation(raw)
        self.normalized_added = self.alternation([self.normalize(c) for c in normed])
        self.normalized_id = {self.normalize(c): t["id"] for c, t in self.added.items() if t.get("normalized", True)}
        self.split = split_pattern()
        self.cache = {}

    @staticmethod
    def alternation(words):
        words = sorted(set(w for w in words if w), key=len, reverse=True)
        return re.compile("|".join(re.escape(w) for w in words)) if words else None

    def normalize(self, text):
        return unicodedata.normalize("NFC", text) if self.nfc else text

    def bpe(self, word):
        """Token ids of one pre-token (already in the byte alphabet): merge the
        adjacent pair of lowest rank, leftmost first, until none applies."""
        ids = self.cache.get(word)
        if ids is not None:
            return ids
        parts = list(word)
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        try:
            ids = [self.vocab[p] for p in parts]
        except KeyError as e:
            raise TokenizerError(f"no token for {e.args[0]!r} after merges") from None
        self.cache[word] = ids
        return ids

    def encode_plain(self, text, out):
        """Text without added tokens: GPT-2 split, byte alphabet, BPE."""
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        for piece in self.split.findall(text):
            out.extend(self.bpe("".join(self.to_char[b] for b in piece.encode("utf-8"))))

    def encode_normalized(self, text, out):
        text = self.normalize(text)
        start = 0
        if self.normalized_added:
            for m in self.normalized_added.finditer(text):
                self.encode_plain(text[start:m.start()], out)
                out.append(self.normalized_id[m.group()])
                start = m.end()
        self.encode_plain(text[start:], out)

    def encode(self, text):
        out, start = [], 0
        if self.raw_added:
            for m in self.raw_added.finditer(text):
                self.encode_normalized(text[start:m.start()], out)
                out.append(self.added[m.group()]["id"])
                start = m.end()
        self.encode_normalized(text[start:], out)
        return out

    def token_bytes(self, i):
        """A token's bytes, as the ByteLevel decoder spells them: through the byte
        alphabet, or as raw UTF-8 when a character is outside it (added tokens)."""
        if i not in self.id_to_token:
            raise TokenizerError(f"token id {i} is not in the vocabulary (0..{self.vocab_size - 1})")
        t = self.id_to_token[i]
        try:
            return bytes(self.to_byte[c] for c in t)
        except KeyError:
            return t.encode("utf-8")

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def byte_tokenizer_json():
    """256 byte tokens and <|endoftext|> (id 256), in tokenizer.json form."""
    alphabet = byte_alphabet()
    eot = {"id": 256, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [eot], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": {alphabet[b]: b for b in range(256)}, "merges": []}}


# --- data shards -------------------------------------------------------------

def input_files(inputs):
    files = []
    for path in inputs:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith((".txt", ".jsonl"))]
        elif path.endswith((".txt", ".jsonl")) and os.path.isfile(path):
            files.append(path)
        else:
            raise TokenizerError(f"{path}: not a .txt or .jsonl file or a folder of them")
    if not files:
        raise TokenizerError("no .txt or .jsonl files in the inputs")
    return files


def documents(files, separator, unsplit):
    """(text, bytes) of every document: a .txt file whole (or split on the
    separator), each line of a .jsonl file (its "text" field). .txt files in
    which the separator does not occur are added to the list unsplit."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.endswith(".txt"):
                text = f.read()
                if separator and separator not in text:
                    unsplit.append(path)
                for doc in (text.split(separator) if separator else [text]):
                    if doc.strip():
                        yield doc, len(doc.encode("utf-8")) + (len(separator.encode()) if separator else 0)
                continue
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise TokenizerError(f"{path}:{n}: not a JSON object with a \"text\" field") from None
                if not isinstance(text, str):
                    raise TokenizerError(f"{path}:{n}: \"text\" is not a string")
                yield text, len(line.encode("utf-8"))


_worker = {}


def _start_worker(tokenizer, max_tokens, eot):
    _worker.update(tokenizer=tokenizer, max_tokens=max_tokens, eot=eot)


def _encode_document(item):
    text, size = item
    ids = _worker["tokenizer"].encode(text)
    if _worker["max_tokens"]:
        ids = ids[:_worker["max_tokens"]]  # the reference truncates each document before packing
    ids.append(_worker["eot"])
    return ids, size, zlib.crc32(text.encode("utf-8"))


class TokenWriter:
    """An llm.c token file written to NAME.tmp and renamed when complete."""

    def __init__(self, path):
        self.path, self.count = path, 0
        self.f = open(path + ".tmp", "wb")
        self.f.write(b"\0" * 1024)

    def write(self, ids):
        self.f.write(b"".join(i.to_bytes(2, "little") for i in ids))
        self.count += len(ids)

    def close(self):
        self.f.seek(0)
        self.f.write(b"".join(x.to_bytes(4, "little", signed=True) for x in (TOKENS_MAGIC, TOKENS_VERSION, self.count)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.path + ".tmp", self.path)


def unescape(text):
    """\\n, \\t, \\r and \\\\ as a shell user types them in --separator '\\n\\n'"""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def shards(args):
    tok = Tokenizer(args.tokenizer)
    if tok.vocab_size > 65536:
        raise TokenizerError(f"{args.tokenizer}: {tok.vocab_size} tokens do not fit the uint16 token files")
    if "<|endoftext|>" not in tok.added and "<|endoftext|>" not in tok.vocab:
        raise TokenizerError(f"{args.tokenizer}: no <|endoftext|> token to put between documents")
    eot = tok.added["<|endoftext|>"]["id"] if "<|endoftext|>" in tok.added else tok.vocab["<|endoftext|>"]
    files = input_files(args.inputs)
    total = sum(os.path.getsize(p) for p in files)
    os.makedirs(args.out, exist_ok=True)
    writers = {"train": TokenWriter(os.path.join(args.out, "train.bin")),
               "val": TokenWriter(os.path.join(args.out, "val.bin"))}
    docs = {"train": 0, "val": 0}
    threshold = int(args.val_fraction * 2 ** 32)
    done, t0, shown, unsplit = 0, time.time(), 0.0, []
    separator = unescape(args.separator) if args.separator else None
    with multiprocessing.Pool(args.workers, _start_worker, (tok, args.max_doc_tokens, eot)) as pool:
        for ids, size, crc in pool.imap(_encode_document, documents(files, separator, unsplit), chunksize=64):
            # the split depends on the text alone: the same document always lands on the same side
            part = "val" if crc < threshold else "train"
            writers[part].write(ids)
            docs[part] += 1
            done = min(total, done + size)  # (a separator is counted once too often per file)
            now = time.time()
            if now - shown > 0.5 or done >= total:
                shown = now
                frac = done / max(total, 1)
                rate = done / max(now - t0, 1e-9) / 1e6
                # the rate of the first fraction of a second says little: no estimate before 1 s
                eta = f"{(total - done) / 1e6 / rate:4.0f}s" if now - t0 >= 1 and rate > 0 else "   -"
                bar = "#" * int(frac * 30)
                print(f"\r[{bar:<30}] {100 * frac:5.1f}% {done / 1e6:8.1f} MB {rate:6.2f} MB/s eta {eta}",
                      end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for path in unsplit:
        print(f"tokenize.py: warning: {path}: the separator {separator!r} does not occur: the file is one document",
              file=sys.stderr)
    if args.val_fraction > 0 and docs["val"] == 0:
        print(f"tokenize.py: warning: val.bin is empty: none of the {docs['train']} documents fell in the validation "
              f"share (--val-fraction {args.val_fraction}); give more documents (a --separator?) or a larger share",
              file=sys.stderr)
    for w in writers.values():
        w.close()
    elapsed = time.time() - t0
    print(f"{args.out}/train.bin: {writers['train'].count} tokens from {docs['train']} documents")
    print(f"{args.out}/val.bin: {writers['val'].count} tokens from {docs['val']} documents")
    print(f"{total / 1e6:.1f} MB in {elapsed:.1f}s: {total / 1e6 / max(elapsed, 1e-9):.2f} MB/s with {args.workers} workers")


# --- evaluation tasks ----------------------------------------------------------
# The reference (Zuhri et al., arXiv:2406.09297; github.com/zaydzuhri/pythia-mlkv)
# scores its models with lm-evaluation-harness, zero-shot, on five tasks. Each
# function below is the harness's task definition (its YAML: doc_to_text,
# doc_to_choice, doc_to_target) for the fields of both published layouts of a
# dataset: the authors' original files and the Hugging Face hub's (as
# `datasets` exports them with to_json). It returns the context, the choices
# (without the target delimiter) and the index of the right one.

def _arc(doc):
    """ARC: hub {question, choices: {text, label}, answerKey}; AI2's original
    {question: {stem, choices: [{text, label}]}, answerKey}"""
    q = doc["question"]
    if isinstance(q, dict):
        texts, labels, q = [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]], q["stem"]
    else:
        texts, labels = doc["choices"]["text"], doc["choices"]["label"]
    return f"Question: {q}\nAnswer:", texts, labels.index(doc["answerKey"])


def _sciq(doc):
    """SciQ (hub and original: the same fields); the right answer is always last"""
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", choices, 3


def _piqa(doc):
    """PIQA: {goal, sol1, sol2, label}; the original keeps labels in a separate
    file (valid-labels.lst, one per line: --labels)"""
    return f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"])


def _boolq(doc):
    """BoolQ as the harness scores it: SuperGLUE's validation split, whose passages
    begin with the article's title, "title -- passage" (hub super_glue/boolq and
    SuperGLUE's val.jsonl: {question, passage, idx, label 0/1}). Google's original
    dev.jsonl {question, title, answer: true/false, passage} keeps the title apart:
    it is joined the same way. The hub's google/boolq has lost the titles: refused."""
    if "title" in doc:
        passage = f"{doc['title']} -- {doc['passage']}"
    elif "label" in doc:
        passage = doc["passage"]
    else:
        raise TokenizerError("a passage without its title (the hub's google/boolq layout): the harness scores "
                             "SuperGLUE's BoolQ, whose passages read 'title -- passage'; use SuperGLUE's "
                             "val.jsonl (hub: super_glue, boolq) or Google's original dev.jsonl")
    gold = int(doc["label"]) if "label" in doc else int(bool(doc["answer"]))
    return f"{passage}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], gold


def _lambada(doc):
    """LAMBADA as OpenAI published it (lambada_test.jsonl, detokenized; the hub's
    EleutherAI/lambada_openai is that file): the target is the last word"""
    words = doc["text"].split(" ")
    return " ".join(words[:-1]), [" " + words[-1]], 0


# task -> (document to (context, choices, gold), target delimiter, kind, metrics reported)
MULTIPLE_CHOICE = ("multiple_choice", ["acc", "acc_norm"])
TASKS = {"arc_easy": (_arc, " ", *MULTIPLE_CHOICE), "sciq": (_sciq, " ", *MULTIPLE_CHOICE),
         "piqa": (_piqa, " ", *MULTIPLE_CHOICE), "boolq": (_boolq, " ", "multiple_choice", ["acc"]),
         "lambada_openai": (_lambada, "", "loglikelihood", ["perplexity", "acc"])}


def raw_documents(path):
    """The rows of a JSON array file or a JSONL file (one object per line)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except ValueError as e:
            raise TokenizerError(f"{path}: not a JSON array: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise TokenizerError(f"{path}:{n}: not a JSON object: {e}") from None
    return rows


def encode_pair(tok, context, continuation):
    """Token ids of a request as lm-evaluation-harness forms them (_encode_pair):
    the context's trailing spaces move to the continuation; the continuation's
    ids are those of context + continuation after the context's own ids. An empty
    context becomes <|endoftext|>."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        eot = tok.added.get("<|endoftext|>")
        if eot is None:
            raise TokenizerError("an empty context needs <|endoftext|> in the tokenizer")
        return [eot["id"]], tok.encode(continuation)
    whole, ids = tok.encode(context + continuation), tok.encode(context)
    return ids, whole[len(ids):]


# A task of one's own is a file of lines like the rows task_file writes, less
# what can be worked out: {"context": ..., "choices": [...], "gold": i}, and
# optionally "task" (default: the file's name), "kind" (default: loglikelihood
# for one choice, scored by its likelihood and whether greedy decoding gives it,
# as LAMBADA; multiple_choice for several), "metrics" (default: perplexity and
# acc, or acc and acc_norm), "target_delimiter" (default " ", put between the
# context and each choice, as the harness does). mlkv eval reads these lines
# as they are and tokenizes them itself (ASCII text); this command writes the
# same lines with the ids, for any text.
def text_task_row(doc, default_name):
    """A hand-written task line with its defaults filled in; ValueError says what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    choices = doc.get("choices")
    if (not isinstance(choices, list) or not 1 <= len(choices) <= 64 or
            not all(isinstance(c, str) for c in choices)):
        raise ValueError('"choices" must list 1 to 64 strings')
    if not isinstance(doc.get("context"), str):
        raise ValueError('"context" must be a string')
    kind = doc.get("kind", "loglikelihood" if len(choices) == 1 else "multiple_choice")
    if kind not in ("loglikelihood", "multiple_choice") or (kind == "loglikelihood" and len(choices) != 1):
        raise ValueError('"kind" must be multiple_choice, or loglikelihood with exactly one choice')
    gold = doc.get("gold", 0 if len(choices) == 1 else None)
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise ValueError('"gold" must be the index of a choice')
    task = doc.get("task", default_name)
    delimiter = doc.get("target_delimiter", " ")
    if not isinstance(task, str) or not task or not isinstance(delimiter, str):
        raise ValueError('"task" and "target_delimiter" must be strings')
    metrics = doc.get("metrics", ["perplexity", "acc"] if kind == "loglikelihood" else ["acc", "acc_norm"])
    return {"task": task, "kind": kind, "metrics": metrics, "context": doc["context"], "choices": choices,
            "gold": gold, "target_delimiter": delimiter}


def task_name_of(path):
    """A task's default name: its file's name without .jsonl."""
    name = os.path.basename(path)
    return name[:-len(".jsonl")] if name.endswith(".jsonl") and len(name) > len(".jsonl") else name


def task_file(args):
    if os.path.exists(args.out) and os.path.samefile(args.input, args.out):
        raise TokenizerError(f"{args.out} is also the input: choose another --out")
    tok = Tokenizer(args.tokenizer)
    docs = raw_documents(args.input)
    if args.labels:
        with open(args.labels, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
        if len(labels) != len(docs):
            raise TokenizerError(f"{args.labels}: {len(labels)} labels for {len(docs)} documents")
        for doc, label in zip(docs, labels):
            doc["label"] = label
    if not docs:
        raise TokenizerError(f"{args.input}: no documents")
    rows = []
    for i, doc in enumerate(docs):
        try:
            if args.task:
                to_request, delimiter, kind, metrics = TASKS[args.task]
                context, choices, gold = to_request(doc)
                row = {"task": args.task, "kind": kind, "metrics": metrics, "doc": i, "context": context,
                       "choices": choices, "gold": gold, "target_delimiter": delimiter}
            else:
                row = dict(text_task_row(doc, task_name_of(args.input)), doc=i)
        except TokenizerError as e:
            raise TokenizerError(f"{args.input}: document {i + 1}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            what = f"what {args.task} needs" if args.task else "a task line's fields"
            raise TokenizerError(f"{args.input}: document {i + 1} lacks {what}: {type(e).__name__} {e}") from None
        if rows and (row["task"], row["kind"]) != (rows[0]["task"], rows[0]["kind"]):
            raise TokenizerError(f"{args.input}: document {i + 1} is {row['task']!r} ({row['kind']}), the file's "
                                 f"first is {rows[0]['task']!r} ({rows[0]['kind']}): one task of one kind per file")
        pairs = [encode_pair(tok, row["context"], row["target_delimiter"] + c) for c in row["choices"]]
        row.update(context_ids=pairs[0][0], continuation_ids=[p[1] for p in pairs])
        rows.append(row)
    with open(args.out, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"{args.out}: {len(docs)} {rows[0]['task']} documents ({rows[0]['kind']})")


# --- command line ------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="tokenize.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("encode", help="print the ids of TEXT (or stdin), separated by spaces")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json")
    p.add_argument("text", nargs="?", help="the text (default: stdin)")
    p = sub.add_parser("decode", help="print the text of IDS (or stdin)")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json")
    p.add_argument("ids", nargs="*", help="token ids (default: stdin, separated by white space)")
    p = sub.add_parser("shards", help="tokenize documents into llm.c token files train.bin and val.bin",
                       description="Tokenizes .txt files (one document each, or split on --separator), .jsonl "
                                   "files (a \"text\" field per line) and folders of them into DIR/train.bin and "
                                   "DIR/val.bin, <|endoftext|> after every document. A document goes to val.bin when "
                                   "the CRC-32 of its text falls in the lowest --val-fraction of the range, so the "
                                   "split depends on the text alone.")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json (at most 65536 tokens)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents for val.bin (0.005)")
    p.add_argument("--max-doc-tokens", type=int, default=0, help="truncate each document to N tokens (0: no limit; "
                                                                  "the reference uses 2048)")
    p.add_argument("--separator", default=None, help="split .txt files into documents on this string; \\n, \\t, "
                                                     "\\r and \\\\ are the characters they stand for")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (all cores)")
    p.add_argument("inputs", nargs="+", help=".txt / .jsonl files or folders")
    p = sub.add_parser("tasks", help="an evaluation task file for mlkv eval, from a dataset's published file",
                       description="Turns a dataset file as its authors or the Hugging Face hub publish it (a JSON "
                                   "array or JSONL; the hub's as datasets' to_json writes it) into a task file for "
                                   "mlkv eval: one JSON object per line with the context and choices of "
                                   "lm-evaluation-harness's zero-shot template, the right choice, and their token ids "
                                   "as the harness tokenizes them. Use the split the reference reports: arc_easy test, "
                                   "lambada_openai test, sciq test, piqa validation, boolq validation (SuperGLUE's, "
                                   "or Google's original dev.jsonl). Without --task the input is a task of your own, "
                                   "one line per document: {\"context\": ..., \"choices\": [...], \"gold\": i} "
                                   "(one choice: scored like LAMBADA, by its likelihood and greedy accuracy; "
                                   "\"task\" defaults to the file's name, \"target_delimiter\" to a space); "
                                   "the output adds the token ids.")
    p.add_argument("--tokenizer", required=True, help="the model's tokenizer.json")
    p.add_argument("--task", choices=sorted(TASKS), help="which task's template (none: the input is a task "
                                                         "of your own)")
    p.add_argument("--input", required=True, help="the dataset file (JSON array or JSONL)")
    p.add_argument("--labels", help="piqa's original labels file (valid-labels.lst), when the rows lack a label")
    p.add_argument("--out", required=True, help="the task file to write (.jsonl)")
    p = sub.add_parser("bytes", help="write a byte-level tokenizer.json (256 bytes + <|endoftext|>)")
    p.add_argument("--out", required=True, help="the tokenizer.json to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "encode":
            tok = Tokenizer(args.tokenizer)
            text = args.text if args.text is not None else sys.stdin.read()
            print(" ".join(map(str, tok.encode(text))))
        elif args.command == "decode":
            tok = Tokenizer(args.tokenizer)
            words = args.ids if args.ids else sys.stdin.read().split()
            try:
                ids = [int(w) for w in words]
            except ValueError as e:
                raise TokenizerError(f"not a token id: {e}") from None
            sys.stdout.buffer.write(tok.decode(ids).encode("utf-8"))
        elif args.command == "shards":
            if not 0 <= args.val_fraction < 1:
                raise TokenizerError("--val-fraction must be in [0, 1)")
            if args.workers < 1 or args.max_doc_tokens < 0:
                raise TokenizerError("--workers must be positive and --max-doc-tokens not negative")
            shards(args)
        elif args.command == "tasks":
            task_file(args)
        else:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(byte_tokenizer_json(), f, ensure_ascii=False, indent=1)
            print(f"wrote {args.out}: 256 byte tokens and <|endoftext|> = 256")
    except (TokenizerError, OSError) as e:
        if args.debug:
            raise
        print(f"tokenize.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
