"""Expected token ids from HF `tokenizers`, for tokenize.py and the C tokenizer.
Run where `tokenizers` is installed (the device machine), from the repository root:

    python3 dev/gen_tokenizer_fixtures.py dev/fixtures/tokenizer

Reads DIR/pythia-tokenizer.json (Pythia's) and DIR/bytes-tokenizer.json
(tokenize.py bytes), writes DIR/expected.json: for each tokenizer, every text
of CORPUS and of a seeded random Unicode corpus with its ids and its decoding
(skip_special_tokens=False), and decodings of id sequences that cut UTF-8
characters apart.
"""
import json
import os
import random
import sys

from tokenizers import Tokenizer

CORPUS = [
    # prose
    "The quick brown fox jumps over the lazy dog.",
    "Multi-Layer Key-Value sharing reduces the KV cache: only a few layers project keys and values, "
    "and every other layer attends over the keys and values of the nearest owning layer below it.",
    "It was the best of times, it was the worst of times, it was the age of wisdom...",
    # contractions, case
    "I'm sure you're right; he'll go, we'd stay, they've left and it's late. DON'T SHOUT'S",
    "'s 't 're 've 'm 'll 'd '' 'x rock'n'roll",
    # code
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "int main(void) {\n\tfor (int i = 0; i < 10; i++) {\n\t\tprintf(\"%d\\n\", i);\n\t}\n\treturn 0;\n}\n",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "<div class=\"x\">a &amp; b</div>  // ---> $PATH ~/src @user #tag",
    # numbers
    "3.14159 1,000,000 2024-11-26 0x1F 1e-5 -42 +7 100% 12:30pm v1.2.3",
    "x² ½ ⅓ Ⅻ ٣٤٥ ௧௨ 一二三 ①②",
    # white space
    "a\tb\t\tc", "line1\nline2\n\n\nline3\n", "   leading spaces", "trailing spaces   ",
    "a" + " " * 30 + "b", "two  spaces and three   and four    ", "\r\nwindows\r\nlines\r\n",
    "no\u00a0break\u2003em\u3000ideographic\u2028line\u2029para\u0085nel",
    "mongolian\u180eseparator zero\u200bwidth joiner\u200d bom\ufeff",
    "\x00\x01\x1f\x7f control \x1c\x1d\x1e\x1f separators", " ", "\n", "\t", "",
    # emoji
    "😀👍🏽👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ ✨🚀",
    # scripts
    "日本語のテキストです。中文字符。한국어 문장입니다.",
    "Ελληνικά Русский язык עברית العربية हिन्दी ไทย ქართული Հայերեն",
    "Tiếng Việt có dấu: Đây là một câu.",
    # combining marks and NFC
    "e\u0301 A\u030a o\u0308 n\u0303 \u1100\u1161\u11a8 Cafe\u0301",
    "\u212b \u2126 \u00c5 \u1e9b\u0323 \ufb01 \u2460 \u00bd",
    "\u0041\u0300\u0316 q\u0307\u0323",
    # added tokens inside text
    "before<|endoftext|>after", "<|endoftext|><|endoftext|>", " <|endoftext|> ", "<|padding|>x",
    "a <|endoftext|>b\n<|endoftext|>\n", "<|endoftext", "<|endoftext|",
    # punctuation and long words
    "!!!???... --- ___ *** ((( ))) [[[ ]]] {{{ }}}",
    "antidisestablishmentarianism supercalifragilisticexpialidocious Pneumonoultramicroscopicsilicovolcanoconiosis",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
]

# old, stable blocks (no drift between Unicode versions of Python and Oniguruma)
POOLS = [
    [chr(c) for c in range(0x20, 0x7F)] * 4,
    list(" \t\n\r\u00a0\u2003\u3000\x0b\x0c\x85\u2028"),
    [chr(c) for c in range(0xA1, 0x180)],
    [chr(c) for c in range(0x391, 0x3CA)] + [chr(c) for c in range(0x410, 0x450)],
    [chr(c) for c in range(0x4E00, 0x4E80)] + [chr(c) for c in range(0x3041, 0x3097)],
    [chr(c) for c in range(0x300, 0x34F)],
    [chr(c) for c in range(0x1F600, 0x1F650)],
    list("0123456789٠١٢٣٤٥٦٧٨٩०१२३४५ⅠⅡⅢ½¼²³"),
    ["<|endoftext|>", "  ", "   ", "'s", "'ll", "\r\n"],
]


def random_corpus(n, seed):
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        pools = rng.sample(POOLS, rng.randint(1, 3))
        texts.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 40))))
    return texts


def main(fixture_dir):
    out = {}
    for name in ("pythia-tokenizer.json", "bytes-tokenizer.json"):
        tok = Tokenizer.from_file(os.path.join(fixture_dir, name))
        cases = []
        for text in CORPUS + random_corpus(300, 7):
            ids = tok.encode(text).ids
            cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
        partial = []  # ids that cut multi-byte characters apart
        for text in ("😀 日本 é", "ü€😀"):
            ids = tok.encode(text).ids
            for k in range(1, len(ids)):
                partial.append({"ids": ids[:k], "decoded": tok.decode(ids[:k], skip_special_tokens=False)})
        out[name] = {"cases": cases, "partial": partial}
        print(name, len(cases), "cases", sum(len(c["ids"]) for c in cases), "ids")
    with open(os.path.join(fixture_dir, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, indent=0)


if __name__ == "__main__":
    main(sys.argv[1])
