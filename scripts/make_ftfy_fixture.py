#!/usr/bin/env python3
"""Regenerates tests/fixtures/tokenizer/ftfy.json: what transformers' slow CLIPTokenizer gives with ftfy installed
(`text_cleanup: ftfy`) and without it (`text_cleanup: basic`), and what ftfy itself gives, which
tests/io_formats/tokenizer_ftfy.rs compares zeroconv's tokenizer and its port of `ftfy.fix_text` with.

The vocabulary is the committed tiny one (tests/fixtures/tokenizer/vocab.json + merges.txt, from
scripts/make_tokenizer_fixture.py): its 256 byte symbols cover any text, so every caption has ids.

Contents:
- `cases`: captions exercising where the two cleanups differ (CJK runs, emoji and ZWJ sequences, full-width
  forms, ligatures, HTML entities, mojibake, curly quotes, C1 controls, no-break spaces, accents, case, long
  captions cut at max_length, special tokens), plus make_tokenizer_fixture.py's captions; for each, ftfy's
  `fix_text` output and, for both cleanups, transformers' tokens and ids at max_length 77 and 16.
- `fix_text`: more strings for `ftfy.fix_text` alone: hand-made ones and mojibake made here by encoding text as
  UTF-8 and decoding it with the encodings ftfy knows (sometimes twice, with lost bytes, with 0xA0 turned into
  spaces, or only a part of the text).
- `badness`: `ftfy.badness.is_bad` for every two-character string over an alphabet of the characters its
  heuristic looks at, and for pseudo-random longer strings drawn with a generator the Rust test reproduces.

And tests/fixtures/tokenizer/ftfy_chars.json: every code point assigned in this Python's Unicode version, alone:
`ftfy.fix_text` of it and CLIPTokenizer's ftfy-path cleanup of it (fix_text, whitespace_clean, lower), listed
where either changes the character.

Versions used: transformers 4.57.6, ftfy 6.3.1, regex 2026.11.19, Python 3.11.7.
Setup (.tools/ is git-ignored):
    python3 -m pip install --no-deps --target .tools/pytf4 transformers==4.57.6 tokenizers==0.22.1 \
        ftfy==6.3.1 wcwidth regex huggingface_hub==0.36.0 safetensors pyyaml packaging filelock requests tqdm \
        numpy fsspec typing_extensions
    PYTHONPATH=.tools/pytf4 python3 scripts/make_ftfy_fixture.py
"""

import base64
import json
import os
import random
import re
import sys
import unicodedata

import ftfy
import ftfy.bad_codecs  # registers the sloppy-* codecs
import regex
import transformers
from ftfy import badness
from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import whitespace_clean

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tokenizer_fixture import CAPTIONS, without_ftfy  # noqa: E402

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokenizer")
OUT = os.path.join(FIXTURE_DIR, "ftfy.json")
OUT_CHARS = os.path.join(FIXTURE_DIR, "ftfy_chars.json")

# (kind, caption): the kinds are what tests/io_formats/tokenizer_ftfy.rs checks are covered.
CASES = [
    ("cjk", "\u6771\u4eac\u30bf\u30ef\u30fc\u306e\u591c\u666f"),
    ("cjk", "\u4e00\u53ea\u53ef\u7231\u7684\u732b\u5750\u5728\u7a97\u53f0\u4e0a"),
    ("cjk", "\u65e5\u672c\u8a9e\u3068English\u306e\u6df7\u5728, \u6f22\u5b57\u304b\u306a\u30ab\u30ca"),
    ("cjk", "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc640 \u4e2d\u6587"),
    ("emoji", "family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 at the beach"),
    ("emoji", "thumbs \U0001f44d\U0001f3fd and a red heart \u2764\ufe0f"),
    ("emoji", "flags \U0001f1ef\U0001f1f5 \U0001f3f4\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f"),
    ("emoji", "cat\U0001f431 rocket\U0001f680 \u2665"),
    ("fullwidth", "\uff21\uff22\uff23\u3000\uff44\uff45\uff46\u3000\uff11\uff12\uff13"),
    ("fullwidth", "\uff28\uff45\uff4c\uff4c\uff4f\uff0c\u3000\uff37\uff4f\uff52\uff4c\uff44\uff01"),
    ("fullwidth", "\uff76\uff80\uff76\uff85 half-width katakana \uff08\uff41\uff09"),
    ("ligature", "\ufb01sh and \ufb02owers in a \ufb01eld"),
    ("ligature", "\ufb00 \ufb03 \ufb04 \ufb05 \ufb06 \u0132ssel \u01c5"),
    ("html", "Tom &amp; Jerry &lt;3"),
    ("html", "it&#39;s a &quot;photo&quot; of caf&eacute; &nbsp;at night"),
    ("html", "&amp;lt; double escaped &#x1F600; &#128512; &hellip;"),
    ("html", "<b>bold</b> &amp; kept because of the tag"),
    ("html", "P&EACUTE;REZ &NTILDE; &nTILDE; &amp no semicolon"),
    ("html", "first line &amp;\nsecond <i> &amp;\nthird &amp;"),
    ("mojibake", "caf\u00c3\u00a9 au lait"),
    ("mojibake", "\u00e2\u20ac\u0153quoted\u00e2\u20ac\x9d and \u00e2\u20ac\u02dcsingle\u00e2\u20ac\u2122"),
    ("mojibake", "na\u00c3\u00afve r\u00c3\u00a9sum\u00c3\u00a9"),
    ("mojibake", "double \u00c3\u0192\u00c2\u00a9 encoded"),
    ("mojibake", "voil\u00c3\u00a0 le travail, \u00c3 la mode"),
    ("mojibake", "\u00d0\u00bf\u00d1\u20ac\u00d0\u00b8\u00d0\u00b2\u00d0\u00b5\u00d1\u201a \u00d0\u00bc\u00d0\u00b8\u00d1\u20ac"),
    ("mojibake", "emoji \u00f0\u0178\u02dc\u20ac mojibake"),
    ("mojibake", "The caf\u00e9 is also caf\u00c3\u00a9"),
    ("mojibake", "\u00e2\u20ac\u0153 like this \u00e2\u20ac\ufffd"),
    ("mojibake", "\u00c3\u00bcber \u00e2\u20ac\u201c dash \u00e2\u20ac\u00a6"),
    ("mojibake", "&macr;\\_(\u00e3\x83\x84)_/&macr;"),
    ("quotes", "\u201cHello,\u201d she said, \u2018it\u2019s fine\u2019"),
    ("c1", "price \x80 5 and \x93quoted\x94 \x81"),
    ("nbsp", "a\u00a0b 100\u00a0km\u00a0\u00a0 wide"),
    ("accents", "Cr\u00e8me br\u00fbl\u00e9e in \u00c5ngstr\u00f6m \u0141\u00f3d\u017a"),
    ("accents", "e\u0301 and a\u0308 composed by NFC"),
    ("case", "ThIs Is MiXeD CaSe, \u0130stanbul \u03a3\u038a\u03a3\u03a5\u03a6\u039f\u03a3"),
    ("control", "bell\x07 tab\t vt\x0b ff\x0c bom\ufeff zw\u200bj\u200d esc\x1b[31mred\x1b[0m"),
    ("control", "line\r\nbreaks\u2028here\u2029and\x85there"),
    ("special", "\uff28\uff49<|endoftext|>\ufb01ne &amp; caf\u00c3\u00a9<|startoftext|>"),
    ("special", "UPPER <|ENDOFTEXT|> &amp;"),
    (
        "long",
        "a very long caption with caf\u00c3\u00a9 mojibake, \ufb01sh, \uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28, "
        "\u6771\u4eac\u30bf\u30ef\u30fc, \U0001f468\u200d\U0001f469\u200d\U0001f467 and &amp; entities: a photo of a cat "
        "sitting on a wooden table next to a window, a painting of a house by the river in the style of an oil "
        "painting, two dogs playing in the snow, high quality, detailed, 1 2 3 4 5 6 7 8 9 10",
    ),
    ("long", "\u732b" * 40 + " " + "\u00c3\u00a9" * 30),
    ("plain", "a photo of a cat"),
    ("plain", "   "),
    ("plain", ""),
]

# Strings for fix_text alone (beyond the captions above).
FIX_TEXT_EXTRA = [
    "\u00e2\u0153\u201d No problems",
    "Broken text&hellip; it&#x2019;s \ufb02ubberi\ufb01c!",
    "\uff2c\uff2f\uff35\uff24\u3000\uff2e\uff2f\uff29\uff33\uff25\uff33",
    "\u00c3\u00a0 la carte, \u00c3 s vezes, \u00c3 quele",
    "sch\u00c3\u00b6n\nsecond line caf\u00c3\u00a9\r\nthird",
    "a < b &amp; c\nd &amp; e",
    "\u00ed \u00bd\u00ed\u00b8\u20ac CESU-8 read as windows-1252",
    "\u00ed\u00a0\u00bd\u00ed\u00b8\u20ac",
    "Java null \u00c0\x80 here",
    "caf\u221a\u00a9 MacRoman",
    "caf\u251c\u2310 cp437",
    "\u00c3\u00a9\u00c3\u00a8 \u00c3\u00a9",
    "&#59; &#12a; &#x; &#0; &#xD800; &#99999999999999; &#1; &#x80; &#153;",
    "\u00e2\u20ac\x9d",
    "\x80\x81\x82",
    "\u00c2\u00a0",
    "\u00c3",
    "\u00c3\n",
    "\u00c0\n",
    "\u0153uvre \u0152uvre",
    "\u0412\u0402\u0412",
    "\u00e2\u20ac\u00a2 bullet \u00e2\u201e\u00a2",
    "\u201cwindows-1252\u201d \u00c3\u00a9 mixed",
    "\u0421\u201a\u0420\u00b5\u0421\u0403\u0421\u201a",
    # Python's `$` before a final newline inside the lenient UTF-8 decoder: the newline is eaten.
    "caf\u00c3\u00a9 \u00c0\n",
    "\u00ed\u00a0\u00bd\u00ed\u00b8\n",
    "\u00c3\u00a9\u00ed\u00a0\u00bd\u00ed\u00b8\x80\n",
    "\u00c3\u00a9\u00ed\n",
]

MOJIBAKE_WORDS = [
    "caf\u00e9", "na\u00efve", "r\u00e9sum\u00e9", "\u00c5ngstr\u00f6m", "\u00fcber", "fa\u00e7ade", "S\u00e3o Paulo",
    "\u00e0 la carte", "\u201cquoted\u201d", "it\u2019s", "\u2014 dash \u2013", "\u2026", "\u20ac100", "\u2122",
    "\u00a9", "\u00bd", "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440", "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    "\u0141\u00f3d\u017a", "\u010ce\u0161tina", "\u0130stanbul", "\u6771\u4eac", "\U0001f600", "\U0001f44d\U0001f3fd",
    "cr\u00e8me br\u00fbl\u00e9e", "\u00bfQu\u00e9 tal?", "\u00a1Hola!", "Stra\u00dfe", "\u00c6r\u00f8",
    "sm\u00f6rg\u00e5sbord", "\u0153uvre", "\u014csaka", "Z\u00fcrich", "pi\u00f1ata", "Krak\u00f3w",
    "\u00abguillemets\u00bb", "\u2022bullet", "50\u00b0C", "5\u00b5m", "\u00d72", "\u00b15", "\u00e0s vezes",
    "\u0645\u0631\u062d\u0628\u0627", "\u05e9\u05dc\u05d5\u05dd", "\u0928\u092e\u0938\u094d\u0924\u0947",
    "a\u00a0b",
]
ASCII_WORDS = ["a", "photo", "of", "the", "cat", "in", "Paris", "menu", "at", "night", "."]
MOJIBAKE_ENCODINGS = [
    "latin-1", "windows-1252", "sloppy-windows-1252", "sloppy-windows-1251", "sloppy-windows-1250",
    "sloppy-windows-1253", "sloppy-windows-1254", "sloppy-windows-1257", "iso-8859-2", "macroman", "cp437",
]


def garble(text, rng):
    """UTF-8 read in a wrong single-byte encoding, maybe twice, maybe with damage."""
    encoding = rng.choice(MOJIBAKE_ENCODINGS)
    out = text.encode("utf-8").decode(encoding, errors="replace")
    if rng.random() < 0.2:
        second = rng.choice(MOJIBAKE_ENCODINGS)
        try:
            out = out.encode("utf-8").decode(second, errors="replace")
        except UnicodeError:
            pass
    if rng.random() < 0.2:
        out = out.replace("\u00a0", " ")
    if rng.random() < 0.1:
        out = out.replace("\ufffd", "?")
    return out


def mojibake_corpus(count, seed):
    rng = random.Random(seed)
    corpus = []
    for _ in range(count):
        words = [rng.choice(MOJIBAKE_WORDS if rng.random() < 0.6 else ASCII_WORDS) for _ in range(rng.randint(1, 5))]
        text = " ".join(words)
        if rng.random() < 0.3:
            # Only part of the text garbled: ftfy's inconsistent-UTF-8 repair.
            cut = rng.randint(0, len(words))
            text = " ".join(words[:cut]) + " " + garble(" ".join(words[cut:]), rng)
        elif rng.random() < 0.85:
            text = garble(text, rng)
        if rng.random() < 0.1:
            text = text + "\n" + garble(rng.choice(MOJIBAKE_WORDS), rng)
        corpus.append(text)
    return corpus


class Lcg:
    """A 64-bit linear congruential generator; tests/io_formats/tokenizer_ftfy.rs draws the same numbers."""

    def __init__(self, seed):
        self.state = seed

    def below(self, n):
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return (self.state >> 33) % n


def badness_groups():
    """Groups of characters the badness heuristic looks at: its categories, the characters its sequences name,
    and some ordinary ones. Random strings pick a group, then a member, so that rare categories show up."""
    groups = []
    for body in badness.MOJIBAKE_CATEGORIES.values():
        compiled = re.compile("[" + body + "]")  # as ftfy compiles it (with `re`)
        members = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF and compiled.fullmatch(chr(c)))
        groups.append(members)
    groups += [
        "\u00c2\u00c3\u00ce\u00d0", "\u00d8\u00d9", "\u0412\u0413\u0420\u0421", "\u0392\u0393\u039e\u039f",
        "\u0152\u0153", "\u00d7\u00b2\u00b3", "\u00e0\u00b2\u00b5\u00b9\u00bc\u00bd\u00be", "\u221a\u2248\u201a\u00c4",
        "\u0432\u0402\u0413\u045e\u03b2\u20ac\u0101\u0386", "\u00a0\u00a1\u00ad\u00b0\u00b5",
        "abcxyz", "ABCXYZ", " \n\t", "0123456789", ".,?!_-'", "\u00e9\u00e8\u00f1\u00fc\u00e7",
        "\u732b\u3042\U0001f600",
    ]
    return groups


def bits(values):
    packed = bytearray((len(values) + 7) // 8)
    for i, v in enumerate(values):
        if v:
            packed[i // 8] |= 1 << (i % 8)
    return base64.b64encode(bytes(packed)).decode("ascii")


def single_characters():
    """Every assigned code point (surrogates aside): the assigned ranges, and what fix_text and CLIPTokenizer's
    ftfy-path cleanup make of the ones they change."""
    assigned, changed = [], []
    for c in range(0x110000):
        ch = chr(c)
        if 0xD800 <= c <= 0xDFFF or unicodedata.category(ch) == "Cn":
            continue
        if assigned and assigned[-1][1] + 1 == c:
            assigned[-1][1] = c
        else:
            assigned.append([c, c])
        fixed = ftfy.fix_text(ch)
        cleaned = whitespace_clean(fixed).lower()  # CLIPTokenizer._tokenize's ftfy path
        if fixed != ch or cleaned != ch:
            changed.append([c, fixed, cleaned])
    return {"python_version": sys.version.split()[0], "unicode_version": unicodedata.unidata_version,
            "ftfy_version": ftfy.__version__, "assigned": assigned, "changed": changed}


def main():
    if ftfy.__version__ != "6.3.1" or not transformers.__version__.startswith("4."):
        sys.exit(f"expected ftfy 6.3.1 and transformers 4.x, found {ftfy.__version__} and {transformers.__version__}")
    files = (os.path.join(FIXTURE_DIR, "vocab.json"), os.path.join(FIXTURE_DIR, "merges.txt"))
    with_ftfy = CLIPTokenizer(*files)
    basic = without_ftfy(lambda: CLIPTokenizer(*files))
    assert with_ftfy.fix_text is ftfy.fix_text and basic.fix_text is None

    def encode(tokenizer, text):
        return {
            "tokens": tokenizer.tokenize(text),
            "ids": tokenizer(text, padding="max_length", max_length=77, truncation=True)["input_ids"],
            "ids_16": tokenizer(text, padding="max_length", max_length=16, truncation=True)["input_ids"],
        }

    cases = [(kind, text) for kind, text in CASES] + [("captions", text) for text in CAPTIONS]
    case_rows = []
    for kind, text in cases:
        case_rows.append(
            {
                "kind": kind,
                "text": text,
                "fix_text": ftfy.fix_text(text),
                "ftfy": encode(with_ftfy, text),
                "basic": encode(basic, text),
            }
        )

    fix_inputs = FIX_TEXT_EXTRA + mojibake_corpus(400, seed=14)
    fix_rows = [[text, ftfy.fix_text(text)] for text in fix_inputs]

    groups = badness_groups()
    alphabet = "".join(sorted(set("".join(groups))))
    pairs = [badness.is_bad(a + b) for a in alphabet for b in alphabet]
    lcg = Lcg(seed=2024)
    random_strings = []
    for _ in range(60000):
        length = 3 + lcg.below(4)
        chars = []
        for _ in range(length):
            group = groups[lcg.below(len(groups))]
            chars.append(group[lcg.below(len(group))])
        random_strings.append("".join(chars))
    fixture = {
        "generated_by": "scripts/make_ftfy_fixture.py",
        "transformers_version": transformers.__version__,
        "ftfy_version": ftfy.__version__,
        "regex_version": regex.__version__,
        "python_version": sys.version.split()[0],
        "unicode_version": unicodedata.unidata_version,
        "tokenizer": "CLIPTokenizer (slow) with ftfy installed ('ftfy') and without ('basic'), "
        "padding=max_length, truncation=True, on vocab.json + merges.txt of this folder",
        "cases": case_rows,
        "fix_text": fix_rows,
        "badness": {
            "alphabet": alphabet,
            "pairs_is_bad": bits(pairs),
            "groups": groups,
            "lcg_seed": 2024,
            "random_count": len(random_strings),
            "random_is_bad": bits([badness.is_bad(s) for s in random_strings]),
        },
    }
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("{\n")
        items = list(fixture.items())
        for i, (key, value) in enumerate(items):
            comma = "," if i + 1 < len(items) else ""
            if isinstance(value, list):
                # One row per line: readable diffs, small file.
                f.write(f" {json.dumps(key)}: [\n")
                f.write(",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in value))
                f.write(f"\n ]{comma}\n")
            else:
                f.write(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}{comma}\n")
        f.write("}\n")
    chars = single_characters()
    with open(OUT_CHARS, "w", encoding="utf-8") as f:
        f.write("{\n")
        for key in ("python_version", "unicode_version", "ftfy_version"):
            f.write(f" {json.dumps(key)}: {json.dumps(chars[key])},\n")
        f.write(f' "assigned": {json.dumps(chars["assigned"], separators=(",", ":"))},\n')
        f.write(' "changed": [\n' + ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in chars["changed"]))
        f.write("\n ]\n}\n")
    differ = sum(c["ftfy"]["ids"] != c["basic"]["ids"] for c in case_rows)
    print(
        f"{len(case_rows)} captions ({differ} with other ids under ftfy), {len(fix_rows)} fix_text strings, "
        f"{len(alphabet)}-character badness alphabet ({sum(pairs)} bad pairs), "
        f"{len(random_strings)} random strings ({sum(badness.is_bad(s) for s in random_strings)} bad)"
    )


if __name__ == "__main__":
    main()
