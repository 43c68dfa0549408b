"""Training speed and memory: `edgelora train` against a plain PEFT + bitsandbytes loop.

Both sides train the same base, data, batch size, LoRA settings and step count, each in its own
process (so peak memory is its own), one after the other in this run; the table reports
steady-state tokens/s of real (not padding) tokens (the first --warmup steps are left out) and
peak memory, and the ratios edgelora / plain. The plain loop is what the PEFT + bitsandbytes docs
show: seeded random batches padded by the tokenizer, labels = input_ids, model(..., labels=...).loss.
edgelora draws the same examples per epoch grouped by length (less padding) and runs the LM head
only at the answer tokens its loss covers; its process runs as `edgelora train`'s does, with
glibc's small-chunk cache off (edgelora/allocator.py; the plain loop's with the environment given).

    python benchmarks/train_speed.py                      # SmolLM2-135M, QLoRA, CPU
    python benchmarks/train_speed.py --device cuda --batch-size 16
    python benchmarks/train_speed.py --base DIR --random-weights   # a model's shape without its weights
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "extract_train.jsonl"


def peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady(times: list[float], tokens: list[int], warmup: int) -> float:
    """tokens/s over the steps after `warmup`; times[i] is when step i+1 finished, times[0] the start."""
    return sum(tokens[warmup:]) / (times[-1] - times[warmup])


def child_edgelora(a, hf_dir: str) -> dict:
    from edgelora.config import load_config
    from edgelora.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, dict(base=hf_dir, data=str(DATA), out=f"{tmp}/run", method=a.method, rank=a.rank,
                                     batch_size=a.batch_size, seq_len=a.seq_len, max_steps=a.steps, device=a.device,
                                     save_every=10**6, seed=0,
                                     grad_checkpointing={"auto": None, "on": True, "off": False}[a.grad_checkpointing]))
        times = []
        res = train(cfg, on_step=lambda s, loss: times.append(time.perf_counter()) and None)
        tokens = [r["tokens"] for r in res.metrics if "tokens" in r]
        times.insert(0, times[0] - res.metrics[0]["tokens"] / res.metrics[0]["tokens_per_s"])
        return {"tokens_per_s": steady(times, tokens, a.warmup), "peak_mem_mb": peak_mb(res.summary.device),
                "final_loss": res.summary.final_loss, "device": res.summary.device}


def child_plain(a, hf_dir: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from edgelora.data import read_jsonl
    from edgelora.trainer import micro_batches

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.padding_side = "right"
    qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if a.method == "qlora" else None
    model = AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=qconf, dtype=dtype, device_map={"": device})
    if a.method == "qlora":
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda" and a.method == "qlora":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4)
    examples, _ = read_jsonl(DATA)
    texts = [tok.apply_chat_template(e.messages, tokenize=False) for e in examples]
    batches = micro_batches(len(texts), a.batch_size, seed=0)
    model.train()
    times, tokens, loss = [time.perf_counter()], [], None
    for _ in range(a.steps):
        enc = tok([texts[i] for i in next(batches)], padding=True, truncation=True, max_length=a.seq_len,
                  add_special_tokens=False, return_tensors="pt").to(device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        tokens.append(int(enc["attention_mask"].sum()))
    return {"tokens_per_s": steady(times, tokens, a.warmup), "peak_mem_mb": peak_mb(device),
            "final_loss": float(loss), "device": device}


def random_weights_dir(src: str, out: Path) -> str:
    """Copy a model's config and tokenizer and give it random weights: speed depends on shape only."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.suffix in (".json", ".jinja", ".txt", ".model") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--random-weights", action="store_true", help="use --base's shape with random weights")
    p.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="alternate the two sides this many times")
    p.add_argument("--grad-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="edgelora's gradient checkpointing (the plain loop's is on, as prepare_model_for_kbit_training sets)")
    p.add_argument("--child", choices=["edgelora", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    if a.child:
        fn = child_edgelora if a.child == "edgelora" else child_plain
        print("RESULT " + json.dumps(fn(a, a.hf_dir)), flush=True)
        return

    from edgelora.allocator import training_env
    from edgelora.bases import materialise, resolve_base

    hf_dir = str(materialise(resolve_base(a.base)))
    edgelora_env = training_env(os.environ) or os.environ  # as `edgelora train` runs
    with tempfile.TemporaryDirectory() as tmp:
        if a.random_weights:
            hf_dir = random_weights_dir(hf_dir, Path(tmp) / "random")
        results: dict[str, list[dict]] = {"edgelora": [], "plain": []}
        for r in range(a.repeats):
            for side in (("edgelora", "plain") if r % 2 == 0 else ("plain", "edgelora")):
                args = [arg for arg in sys.argv[1:] if arg != "--random-weights"]
                cmd = [sys.executable, __file__, *args, "--child", side, "--hf-dir", hf_dir]
                env = edgelora_env if side == "edgelora" else os.environ
                out = subprocess.run(cmd, capture_output=True, text=True, env={**env, "TQDM_DISABLE": "1"})
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode or not line:
                    sys.exit(f"{side} run failed:\n{out.stderr[-3000:]}")
                results[side].append(json.loads(line[0][7:]))
                print(f"  {side:9s} run {r + 1}: {results[side][-1]['tokens_per_s']:.0f} tok/s, "
                      f"peak {results[side][-1]['peak_mem_mb']:.0f} MB", flush=True)
    best = {k: max(v, key=lambda x: x["tokens_per_s"]) for k, v in results.items()}
    mem = {k: min(x["peak_mem_mb"] for x in v) for k, v in results.items()}
    dev = best["edgelora"]["device"]
    kind = "GPU memory allocated" if dev == "cuda" else "peak RSS"
    print(f"\n{a.method} on {dev}, base {a.base}{' (random weights)' if a.random_weights else ''}, "
          f"batch {a.batch_size}, seq-len {a.seq_len}, rank {a.rank}, {a.steps} steps ({a.warmup} warm-up), "
          f"edgelora's gradient checkpointing {a.grad_checkpointing}, GLIBC_TUNABLES "
          f"{edgelora_env.get('GLIBC_TUNABLES')} (edgelora) / {os.environ.get('GLIBC_TUNABLES')} (plain)")
    print("| | edgelora | plain PEFT+bnb | ratio |\n|---|---|---|---|")
    print(f"| tokens/s | {best['edgelora']['tokens_per_s']:.0f} | {best['plain']['tokens_per_s']:.0f} | "
          f"{best['edgelora']['tokens_per_s'] / best['plain']['tokens_per_s']:.2f} |")
    print(f"| {kind} (MB) | {mem['edgelora']:.0f} | {mem['plain']:.0f} | {mem['edgelora'] / mem['plain']:.2f} |")
    speedup = best["edgelora"]["tokens_per_s"] / best["plain"]["tokens_per_s"]
    floor = 2.0 if dev == "cuda" else 1.5  # issue #14
    print(f"\n{'PASS' if speedup >= floor else 'MISS'}  tokens/s at least {floor}x the plain loop's: {speedup:.2f}x")
    print(f"{'PASS' if mem['edgelora'] <= mem['plain'] else 'MISS'}  peak memory at most the plain loop's: "
          f"{mem['edgelora']:.0f} vs {mem['plain']:.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
