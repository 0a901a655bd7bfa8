#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2_tokens.json: reference token ids for the SmolLM2 tokenizer.

The tokenizer is built here independently of anyq, with the Hugging Face `tokenizers` package,
from the vocabulary and merges stored in the GGUF (read with the `gguf` package), exactly as
SmolLM2's tokenizer.json defines it: byte-level BPE, pre-tokenizer
Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)],
ByteLevel decoder, control tokens (GGUF token_type 3) as special added tokens. It then dumps the
ids of varied strings, among them a paragraph of Persuasion.

Needs: pip install gguf tokenizers. Assets come from scripts/install-assets.
Usage: scripts/tokenizer_fixture.py [--assets DIR] [--out FILE]
"""
import argparse
import importlib.metadata as md
import json
import os
import re
from pathlib import Path

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CASES = [
    ("ascii", "Hello, world! This is a test."),
    ("digits", "In 1813 there were 12345 books, 3.14159 and 007."),
    # Non-ASCII numerals: only the Digits step splits these apart from their neighbours.
    ("unicode_numerals", "10½ and ¼ cup, x² ٣٤ ١٢٣, Chapter Ⅻ ①②"),
    ("contractions", "I'm sure you'll see they've done it, don't you? YOU'LL"),
    ("unicode_latin", "café naïve résumé — “quoted” ’tis"),
    ("unicode_cjk_emoji", "日本語のテキスト 😀👍🏽 Ελληνικά"),
    ("whitespace_runs", "two  spaces,   three   and    four"),
    ("leading_trailing", "   leading and trailing   "),
    ("newlines_tabs", "line one\nline two\n\n\tindented\r\nwindows"),
    ("code", "fn main() {\n    println!(\"{}\", x + 1);\n}\n"),
    ("url_email", "See https://example.com/a?b=1&c=2 or mail me@example.org."),
    ("special_tokens", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
    ("special_inline", "text<|endoftext|>more"),
    ("punctuation", "Wait... what?! (Yes) [no] {maybe} -- #1 @home $5.00 100%"),
    ("empty", ""),
    ("single_space", " "),
]


def field_strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def field_ints(reader, key):
    f = reader.fields[key]
    return [int(f.parts[i][0]) for i in f.data]


def build_tokenizer(reader):
    tokens = field_strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field_strings(reader, "tokenizer.ggml.merges")]
    types = field_ints(reader, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(t, special=(ty == 3), normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (3, 4)
    ]
    tok.add_tokens(added)
    return tok


def persuasion_paragraph(assets):
    text = (assets / "text" / "persuasion.txt").read_text(encoding="utf-8")
    start = text.index("Sir Walter Elliot")
    end = text.rindex(" ", start, start + 1500)
    return text[start:end]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=Path(os.environ.get("ANYQ_ASSETS", ROOT / "assets")))
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "smollm2_tokens.json")
    args = ap.parse_args()

    reader = gguf.GGUFReader(args.assets / MODEL_NAME)
    tok = build_tokenizer(reader)
    cases = CASES + [("persuasion_paragraph", persuasion_paragraph(args.assets))]
    out = {
        "generator": "scripts/tokenizer_fixture.py",
        "model": MODEL_NAME,
        "tokenizers_version": md.version("tokenizers"),
        "gguf_version": md.version("gguf"),
        "note": "ids without added BOS/EOS (add_special_tokens=False); special tokens in text are matched",
        "cases": [],
    }
    for name, text in cases:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, name
        out["cases"].append({"name": name, "text": text, "ids": ids})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(out, ensure_ascii=False, indent=1)
    # One line per id list keeps the file readable.
    text = re.sub(r"\[\s+([\d,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {len(out['cases'])} cases to {args.out}")


if __name__ == "__main__":
    main()
