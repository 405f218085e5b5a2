#!/usr/bin/env python3
"""Regenerates tests/fixtures/tokenizer/: a small CLIP-style BPE vocabulary and the ids that Hugging Face
transformers' CLIPTokenizer gives for a set of captions, which tests/io_formats/tokenizer.rs compares zeroconv's tokenizer with.

The vocabulary has CLIP's layout (the 256 byte symbols, the same with "</w>", one token per merge, then
<|startoftext|> and <|endoftext|>); its merges are learned here, by plain BPE, from the small caption corpus below.
The expected ids come from transformers' slow CLIPTokenizer without ftfy (its `basic` path: the tokenizer is built
while `import ftfy` fails, so ftfy may be installed); the fast tokenizer's ids are recorded beside them, to show
where the two differ. scripts/make_ftfy_fixture.py records the ftfy path (zeroconv's default).

Setup (.tools/ is git-ignored):
    python3 -m pip install --target .tools/py "transformers>=4.50,<5"
    PYTHONPATH=.tools/py python3 scripts/make_tokenizer_fixture.py
"""

import collections
import json
import os
import sys

import regex
import transformers
from transformers import CLIPTokenizer, CLIPTokenizerFast

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokenizer")
NUM_MERGES = 400

CORPUS = """
a photo of a cat sitting on a wooden table next to a window
a painting of a house by the river in the style of an oil painting
two dogs playing in the snow, high quality, detailed
a red car parked in front of a modern building at night
the city skyline at sunset with clouds and reflections on the water
a portrait of a woman with long hair, soft lighting, studio photo
an old man reading a newspaper in a park on a sunny day
a bowl of fruit with apples, oranges and bananas on a kitchen table
a mountain landscape with a lake and pine trees in the morning
a close up photo of a flower with water drops on the petals
a drawing of a robot holding a sign that says hello world
children running on the beach near the ocean waves
a cozy living room with a fireplace, a sofa and a lamp
a black and white photo of a train station in the rain
a bird flying over the forest, photo taken with a telephoto lens
a plate of pasta with tomato sauce and cheese
a street at night with neon lights and people walking
an astronaut riding a horse on the moon, digital art
a green field with cows and a farm house in the distance
a boat on a calm lake surrounded by mountains
it's a dog's life; they're happy and we'll see what they've done
the cat isn't sleeping, i'm sure she'd like some milk
""".strip().splitlines()

CAPTIONS = [
    "a photo of a cat",
    "A Photo Of A CAT sitting on the TABLE",
    "  lots   of\twhitespace\nand newlines  ",
    "Café crème brûlée à la française",
    "naïve résumé façade",
    "e\u0301 composed by NFC, and a\u0308 too",
    "It's a dog's life, isn't it? We'll see; they'd've known. I'M SURE",
    "Don\u2019t use curly quotes \u201clike this\u201d",
    "Hello, world!!! (really?) #tag @user $100 50% a+b=c ... --- :)",
    "The year 2024 had 365 days and 3.14159 is pi",
    "\u2460\u2461\u2462 \u216b \u00be numbers in other scripts",
    "\u6771\u4eac\u30bf\u30ef\u30fc\u306e\u591c\u666f",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u039f\u0394\u039f\u03a3 \u03a3\u0391\u03a3",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440",
    "emoji \U0001f431\U0001f680 and \u2665 symbols",
    "tab\tand\u00a0nbsp\u2003em space",
    "zero\u200bwidth\u200djoiner",
    "control\x07char\x00null\ufffdreplacement",
    "a photo<|endoftext|>of two <|startoftext|>cats",
    "uppercase <|ENDOFTEXT|> special",
    "",
    "   ",
    "wow! what a view!",
    "\u0130stanbul at night",
    "\ufb01ne ligature \uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28",
    "mixed123abc and x2y",
    "a\u2028b\u2029c",
    (
        "a very long caption that goes on and on: a photo of a cat sitting on a wooden table next to a window, "
        "a painting of a house by the river in the style of an oil painting, two dogs playing in the snow, high "
        "quality, detailed, a red car parked in front of a modern building at night, the city skyline at sunset "
        "with clouds and reflections on the water, 1 2 3 4 5 6 7 8 9 10"
    ),
]

CLIP_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode():
    """GPT-2's byte -> printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    bs += list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def learn_merges(lines, count):
    """Plain BPE over the corpus's words; ties go to the lexicographically smallest pair (deterministic)."""
    table = bytes_to_unicode()
    words = collections.Counter()
    for line in lines:
        for word in CLIP_SPLIT.findall(line.lower()):
            symbols = [table[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def write_vocab(merges):
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    with open(os.path.join(OUT_DIR, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=0)
        f.write("\n")
    with open(os.path.join(OUT_DIR, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return vocab


def without_ftfy(make):
    """Builds a tokenizer while `import ftfy` fails, so that CLIPTokenizer takes its no-ftfy path."""
    saved = sys.modules.get("ftfy")
    sys.modules["ftfy"] = None
    try:
        return make()
    finally:
        if saved is None:
            del sys.modules["ftfy"]
        else:
            sys.modules["ftfy"] = saved


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    vocab = write_vocab(learn_merges(CORPUS, NUM_MERGES))
    files = (os.path.join(OUT_DIR, "vocab.json"), os.path.join(OUT_DIR, "merges.txt"))

    slow = without_ftfy(lambda: CLIPTokenizer(*files))
    slow_bang = without_ftfy(lambda: CLIPTokenizer(*files, pad_token="!"))
    if slow.fix_text is not None or slow_bang.fix_text is not None:
        sys.exit("CLIPTokenizer took its ftfy path; this fixture is the path without ftfy")
    fast = CLIPTokenizerFast(*files)
    fast.backend_tokenizer.save(os.path.join(OUT_DIR, "tokenizer.json"))

    def ids(tokenizer, text, max_length):
        return tokenizer(text, padding="max_length", max_length=max_length, truncation=True)["input_ids"]

    cases = []
    for text in CAPTIONS:
        expected = ids(slow, text, 77)
        cases.append(
            {
                "text": text,
                "tokens": slow.tokenize(text),
                "ids": expected,
                "ids_max_length_16": ids(slow, text, 16),
                "ids_pad_bang": ids(slow_bang, text, 77),
                "fast_tokenizer_agrees": ids(fast, text, 77) == expected,
            }
        )
    fixture = {
        "generated_by": "scripts/make_tokenizer_fixture.py",
        "transformers_version": transformers.__version__,
        "tokenizer": "CLIPTokenizer (slow, without ftfy), padding=max_length, truncation=True",
        "vocab_size": len(vocab),
        "bos_id": slow.bos_token_id,
        "eos_id": slow.eos_token_id,
        "pad_id": slow.pad_token_id,
        "pad_bang_id": slow_bang.pad_token_id,
        "cases": cases,
    }
    with open(os.path.join(OUT_DIR, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    differ = [c["text"] for c in cases if not c["fast_tokenizer_agrees"]]
    print(f"{len(vocab)} tokens, {len(cases)} captions; the fast tokenizer differs on {len(differ)}: {differ}")


if __name__ == "__main__":
    main()
