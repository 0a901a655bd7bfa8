#!/usr/bin/env python3
"""Reference outputs of the real model, computed by an independent implementation.

PyTorch + Hugging Face transformers load the GGUF (through the `gguf` package, dequantized to
float32) and compute, on the CPU in float32:
  * last-position logits, top-10 and a 32-token greedy continuation for a few prompts,
  * a WikiText-2 style perplexity on the start of Persuasion,
  * reference token ids for a few tricky strings, plus the chat template.
The results go to tests/fixtures/ (smollm2_reference.json and raw little-endian f32 logits
files), which the Rust tests compare against. Run it through scripts/make-fixtures.

Tokenizer: the real SmolLM2 tokenizer (tokenizer.json) pre-tokenizes with
Sequence[Digits(individual_digits=true), ByteLevel(add_prefix_space=false)] (llama.cpp calls it
the "smollm" pre-tokenizer). transformers' GGUF->tokenizer conversion may drop the Digits step,
so this script also builds that tokenizer from the GGUF's vocab/merges with the `tokenizers`
package, compares the two, and uses the faithful one for every id in the fixtures
(recorded as "tokenizer_reference").
"""
import argparse
import importlib.metadata as md
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS = [
    "The capital of France is",
    "In 1813, Jane Austen published",
    "Once upon a time, there was a little robot who",
]
GREEDY_TOKENS = 32

PPL_TEXT = "persuasion.txt"
PPL_CTX = 256
PPL_WINDOWS = 4

TOKENIZATION = [
    ("digits", "In 1813 there were 12345 books."),
    ("unicode", "café naïve — “quoted” ’tis"),
    ("whitespace", "  two  spaces\n\nnewlines\ttab"),
    ("chat_special", "<|im_start|>user\nHi<|im_end|>"),
    # Non-ASCII numerals: here the Digits pre-tokenizer matters even though the vocabulary has
    # no merges between ASCII digits.
    ("unicode_numerals", "e = mc², x^2, 10½, ¼ and ٣٤"),
    ("plain", "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."),
]

CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def version(pkg):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "unknown"


def build_manual_tokenizer(gguf_path):
    """The SmolLM2 tokenizer as in its tokenizer.json, rebuilt from the GGUF's vocab and merges."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(str(gguf_path))
    f = reader.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = f["tokenizer.ggml.merges"].contents()
    meta = {
        "pre": f["tokenizer.ggml.pre"].contents(),
        "bos_id": int(f["tokenizer.ggml.bos_token_id"].contents()),
        "eos_id": int(f["tokenizer.ggml.eos_token_id"].contents()),
        "chat_template": f["tokenizer.chat_template"].contents(),
    }
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in the GGUF vocabulary"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    control = [i for i, t in enumerate(types) if int(t) == 3]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    meta["control_ids"] = control
    return tok, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=os.environ.get("ANYQ_ASSETS", str(ROOT / "assets")))
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    assets = Path(args.assets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf_path = assets / MODEL_NAME

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # ---- tokenizers -------------------------------------------------------------------------
    hf_tok = AutoTokenizer.from_pretrained(str(assets), gguf_file=MODEL_NAME)
    manual_tok, meta = build_manual_tokenizer(gguf_path)
    log(f"GGUF pre-tokenizer type: {meta['pre']}; transformers pre-tokenizer: "
        f"{hf_tok.backend_tokenizer.pre_tokenizer}")

    def hf_ids(s):
        return list(hf_tok.encode(s, add_special_tokens=False))

    def manual_ids(s):
        return list(manual_tok.encode(s, add_special_tokens=False).ids)

    ppl_text = (assets / "text" / PPL_TEXT).read_text(encoding="utf-8")
    checks = [s for _, s in TOKENIZATION] + PROMPTS + [ppl_text]
    disagree = [s for s in checks if hf_ids(s) != manual_ids(s)]
    digits_ok = len(hf_ids("12345")) == 5
    log(f"transformers splits '12345' into single digits: {digits_ok}; "
        f"disagrees with the Digits+ByteLevel tokenizer on {len(disagree)} of {len(checks)} strings")
    if disagree:
        encode = manual_ids
        decode = lambda ids: manual_tok.decode(ids, skip_special_tokens=False)
        tokenizer_reference = (
            "tokenizers BPE built from the GGUF vocab/merges with pre_tokenizer "
            "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)], "
            "ByteLevel decoder, control tokens (token_type 3) as special tokens; transformers' GGUF "
            f"conversion uses {hf_tok.backend_tokenizer.pre_tokenizer} (no Digits step) and differs on "
            f"{len(disagree)} of the checked strings (e.g. {disagree[0]!r})")
    else:
        encode = hf_ids
        decode = lambda ids: hf_tok.decode(ids, skip_special_tokens=False)
        tokenizer_reference = ("transformers AutoTokenizer from the GGUF; identical to a "
                               "Digits+ByteLevel BPE built from the GGUF on all checked strings")
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = encode(name)
        assert len(ids) == 1, f"{name} is not a single token: {ids}"

    tokenization = []
    for name, s in TOKENIZATION:
        ids = encode(s)
        assert decode(ids) == s, f"round trip failed for {name}"
        entry = {"name": name, "text": s, "ids": ids}
        if hf_ids(s) != ids:
            entry["transformers_ids"] = hf_ids(s)
        tokenization.append(entry)

    chat_rendered = hf_tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)

    # ---- model ------------------------------------------------------------------------------
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(assets), gguf_file=MODEL_NAME, dtype=torch.float32)
    model.eval()
    assert model.dtype == torch.float32
    assert model.config.vocab_size == 49152
    log(f"model loaded in {time.time() - t0:.1f}s")

    @torch.no_grad()
    def last_logits_and_greedy(ids):
        """Full-prompt last-position logits, then exactly GREEDY_TOKENS argmax steps with a KV cache."""
        x = torch.tensor([ids], dtype=torch.long)
        res = model(input_ids=x, use_cache=True)
        logits0 = res.logits[0, -1].float().numpy().copy()
        past = res.past_key_values
        nxt = int(np.argmax(logits0))
        gen = [nxt]
        while len(gen) < GREEDY_TOKENS:
            res = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(torch.argmax(res.logits[0, -1]))
            gen.append(nxt)
        # Consistency: one cache-free pass over prompt + continuation predicts the same tokens.
        full = model(input_ids=torch.tensor([ids + gen]), use_cache=False).logits[0]
        check = full[len(ids) - 1:-1].argmax(-1).tolist()
        if check != gen:
            n = sum(a == b for a, b in zip(check, gen))
            log(f"warning: cache-free argmax agrees on {n}/{len(gen)} greedy tokens (near-tie?)")
        return logits0, gen

    prompts = []
    for i, text in enumerate(PROMPTS):
        t0 = time.time()
        ids = encode(text)
        logits, gen = last_logits_and_greedy(ids)
        assert logits.shape == (49152,) and np.all(np.isfinite(logits))
        fname = f"smollm2_prompt{i}_logits.f32"
        logits.astype("<f4").tofile(out / fname)
        top = np.argsort(-logits, kind="stable")[:10]
        entry = {
            "text": text,
            "ids": ids,
            "logits_file": fname,
            "top": [[int(t), float(logits[t])] for t in top],
            "greedy": gen,
            "greedy_text": decode(gen),
        }
        prompts.append(entry)
        log(f"prompt {i} ({time.time() - t0:.1f}s): {text!r} -> {entry['greedy_text']!r}")

    # ---- perplexity -------------------------------------------------------------------------
    t0 = time.time()
    all_ids = encode(ppl_text)
    need = PPL_CTX * PPL_WINDOWS
    assert len(all_ids) >= need
    used = all_ids[:need]
    nll_per_window = []
    total_nll, total_n = 0.0, 0
    with torch.no_grad():
        for w in range(PPL_WINDOWS):
            window = used[w * PPL_CTX:(w + 1) * PPL_CTX]
            logits = model(input_ids=torch.tensor([window]), use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            tgt = torch.tensor(window[1:])
            nll = -logp[torch.arange(len(tgt)), tgt]
            nll_per_window.append(float(nll.mean()))
            total_nll += float(nll.sum())
            total_n += len(tgt)
    ppl = math.exp(total_nll / total_n)
    log(f"perplexity {PPL_TEXT} ctx {PPL_CTX} x {PPL_WINDOWS}: {ppl:.4f} "
        f"(per-window NLL {[round(v, 4) for v in nll_per_window]}) in {time.time() - t0:.1f}s")
    assert ppl < 100, "perplexity far too high: weights (e.g. the Q/K layout) are likely wrong"

    # ---- write ------------------------------------------------------------------------------
    doc = {
        "model": MODEL_NAME,
        "reference": (f"torch {version('torch')}, transformers {version('transformers')}, "
                      f"gguf {version('gguf')}, tokenizers {version('tokenizers')}; "
                      f"float32 on CPU, GGUF weights dequantized by transformers"),
        "tokenizer_reference": tokenizer_reference,
        "bos_id": meta["bos_id"],
        "eos_id": meta["eos_id"],
        "prompts": prompts,
        "perplexity": {
            "text_file": PPL_TEXT,
            "ctx": PPL_CTX,
            "windows": PPL_WINDOWS,
            "ids": used,
            "nll_per_window": nll_per_window,
            "ppl": ppl,
            "n_tokens_total": len(all_ids),
        },
        "tokenization": tokenization,
        "chat_template": meta["chat_template"],
        "chat_rendered": chat_rendered,
    }
    path = out / "smollm2_reference.json"
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    # Keep lists of numbers on one line each.
    text = re.sub(r"\[\s*([-+0-9.eE,\s]*?)\s*\]", lambda m: "[" + re.sub(r",\s*", ", ", m.group(1)) + "]", text)
    assert json.loads(text) == doc
    path.write_text(text + "\n", encoding="utf-8")
    files = [path] + [out / p["logits_file"] for p in prompts]
    size = sum(f.stat().st_size for f in files)
    log(f"wrote {len(files)} files, {size} bytes, to {out} in {time.time() - t_start:.1f}s")
    assert size < 1_500_000


if __name__ == "__main__":
    main()
