"""GGUF export: time and size per quant, and how close each file runs to the source model.

Trains a small Llama-style model (a few M parameters, rows that the k-quants' 256-blocks divide) on the bundled
demo stories for `--steps` steps with a plain loop, saves it as a Modron checkpoint, then exports it once per
quant with `export_gguf` and records the export's seconds and the file's bytes. For each file:

- **transformers**: the GGUF read back with transformers' own GGUF loader (dequantized), its perplexity on
  held-out text against the source model's (torch);
- **llama.cpp** (when llama-cpp-python is importable; the k-quants only then): the file run in llama.cpp,
  its perplexity on the same tokens and its greedy continuation of a prompt against torch's (tokens that
  agree before the first difference).

    python bench/gguf_export.py                   # ~2 min on 2 cores
    python bench/gguf_export.py --steps 600 --hidden 384

Prints one JSON line, then readable lines.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from training_core.config import JobSpec  # noqa: E402
from training_core.gguf_export import PYTHON_QUANTS, QUANTS, export_gguf, k_quants_available  # noqa: E402
from training_core.models.tokenizer import train_tokenizer  # noqa: E402

STORIES = ROOT / "resources" / "demo" / "stories"
PROMPT = "Once upon a time, in a small village by the sea,"


def stories() -> tuple[str, str]:
    """(training text, held-out text): the last story file is held out."""
    files = sorted(STORIES.glob("*.txt"))
    train = "\n\n".join(f.read_text(encoding="utf-8") for f in files[:-1])
    return train, files[-1].read_text(encoding="utf-8")


def train_model(args, tok, text: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 128 or 1, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor(tok(text)["input_ids"])
    seq, batch = 128, 8
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / args.steps))
    model.eval()
    return model


def write_checkpoint(run: Path, model, tok) -> None:
    ckpt = run / "checkpoints" / "ckpt-00000001"
    ckpt.mkdir(parents=True)
    model.save_pretrained(ckpt / "model", safe_serialization=True)
    tok.save_pretrained(ckpt / "tokenizer")
    spec = JobSpec(model="scratch:tiny", data=[str(STORIES)], out=str(run))
    (ckpt / "job.json").write_text(json.dumps(spec.to_dict()), encoding="utf-8")
    (ckpt / "modron_checkpoint.json").write_text(json.dumps({"format": "modron-checkpoint", "version": 1,
                                                             "step": 1, "kind": "full"}), encoding="utf-8")


def torch_ppl(model, ids: list[int], ctx: int) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, ctx):
            x = torch.tensor([ids[s:s + ctx + 1]])
            if x.shape[1] < 2:
                break
            logits = model(input_ids=x[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            n += x.shape[1] - 1
    return math.exp(total / n)


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    return out[0, len(ids):].tolist()


def llama_cpp_figures(path: Path, ids: list[int], prompt: list[int], n: int, ctx: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx + 1, logits_all=True, verbose=False, n_threads=threads,
                          n_batch=ctx + 1)
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, ctx):
        chunk = ids[s:s + ctx + 1]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk[:-1])
        logits = np.asarray(llm.scores[:len(chunk) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= logp[np.arange(len(chunk) - 1), chunk[1:]].sum()
        count += len(chunk) - 1
    llm.reset()
    out = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) >= n:
            break
    return {"ppl": math.exp(total / count), "greedy": out}


def time_preset(name: str, quants: list[str], vocab: int) -> dict:
    """Export seconds and bytes per quant for an untrained scratch preset (a size closer to real use)."""
    from training_core.models.presets import preset_config
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config(name, vocab_size=vocab))
    tok = train_tokenizer([stories()[0]], vocab)
    rows = []
    with tempfile.TemporaryDirectory(prefix="modron-gguf-bench-") as tmp:
        run = Path(tmp) / "run"
        write_checkpoint(run, model, tok)
        for quant in quants:
            t = time.perf_counter()
            answer = export_gguf(run, Path(tmp) / f"{quant}.gguf", quant)
            rows.append({"quant": quant, "export_s": round(time.perf_counter() - t, 2), "bytes": answer["bytes"]})
            Path(answer["gguf"]).unlink()
    return {"preset": name, "params": sum(p.numel() for p in model.parameters()), "quants": rows}


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=128, help="tokens per perplexity window")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-preset", metavar="NAME", help="also time the exports of an untrained scratch preset "
                                                            "of this size (e.g. small, ~40 M): seconds and bytes only")
    args = ap.parse_args()
    has_llama = k_quants_available()
    quants = [q for q in QUANTS if q in PYTHON_QUANTS or has_llama]

    train, held_out = stories()
    tok = train_tokenizer([train], args.vocab)
    t0 = time.perf_counter()
    model = train_model(args, tok, train)
    train_s = time.perf_counter() - t0
    ids = tok(held_out)["input_ids"][:args.ctx * 8 + 1]
    prompt = tok(PROMPT)["input_ids"]
    source = {"ppl": torch_ppl(model, ids, args.ctx), "greedy": torch_greedy(model, prompt, args.new_tokens)}
    params = sum(p.numel() for p in model.parameters())

    rows = []
    with tempfile.TemporaryDirectory(prefix="modron-gguf-bench-") as tmp:
        run = Path(tmp) / "run"
        write_checkpoint(run, model, tok)
        for quant in quants:
            out = Path(tmp) / f"model-{quant}.gguf"
            t = time.perf_counter()
            answer = export_gguf(run, out, quant)
            row = {"quant": quant, "export_s": round(time.perf_counter() - t, 2), "bytes": answer["bytes"]}
            if quant in PYTHON_QUANTS:
                back = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=out.name)
                back.eval()
                row["transformers_ppl"] = round(torch_ppl(back, ids, args.ctx), 4)
                row["transformers_greedy_agree"] = agree(torch_greedy(back, prompt, args.new_tokens),
                                                         source["greedy"])
                del back
            if has_llama:
                figures = llama_cpp_figures(out, ids, prompt, args.new_tokens, args.ctx, args.threads)
                row["llama_cpp_ppl"] = round(figures["ppl"], 4)
                row["llama_cpp_greedy_agree"] = agree(figures["greedy"], source["greedy"])
            rows.append(row)

    timing = time_preset(args.timing_preset, quants, len(tok)) if args.timing_preset else None

    report = {"bench": "gguf_export", "params": params, "steps": args.steps, "train_s": round(train_s, 1),
              "held_out_tokens": len(ids) - 1, "source_ppl": round(source["ppl"], 4),
              "new_tokens": args.new_tokens, "llama_cpp": has_llama, "quants": rows, "timing": timing}
    print(json.dumps(report))
    print(f"{params:,} parameters, trained {args.steps} steps in {train_s:.0f} s; held-out perplexity (torch) "
          f"{source['ppl']:.3f} over {len(ids) - 1} tokens; greedy continuation of {args.new_tokens} tokens")
    for r in rows:
        line = f"{r['quant']:7} {r['bytes'] / 1e6:7.2f} MB  export {r['export_s']:5.2f} s"
        if "transformers_ppl" in r:
            line += (f"  transformers ppl {r['transformers_ppl']:.3f} "
                     f"greedy {r['transformers_greedy_agree']}/{args.new_tokens}")
        if "llama_cpp_ppl" in r:
            line += f"  llama.cpp ppl {r['llama_cpp_ppl']:.3f} greedy {r['llama_cpp_greedy_agree']}/{args.new_tokens}"
        print(line)
    if timing:
        print(f"scratch:{timing['preset']} ({timing['params']:,} parameters, untrained): "
              + ", ".join(f"{r['quant']} {r['export_s']:.1f} s {r['bytes'] / 1e6:.1f} MB" for r in timing["quants"]))
    if not has_llama:
        print("llama-cpp-python is not importable here: no llama.cpp figures and no k-quants")


if __name__ == "__main__":
    main()
