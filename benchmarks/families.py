"""The laptop favourites one by one, at their real widths: does each convert, load in llama.cpp,
compute what transformers computes, and quantise to q4_k_m without falling back?

No hub here, so each model is its published config's shape (hidden size, heads, head_dim,
vocabulary, RoPE, sliding window, no-RoPE layers...) with random weights and a few layers; the
text comes from SmolLM2's tokenizer (its 49152 ids sit inside every vocabulary here, Phi-3.5's
32064 raised to 49152 for that). Per family: our f32 GGUF's logits against transformers' on 48
tokens (max |diff| relative to max |logit|, top-1 agreement), then llama.cpp's q4_k_m with its
real bits/weight and how many weights fell back to another type (rows not a multiple of 256).

    python benchmarks/families.py                  # all
    python benchmarks/families.py qwen3-0.6b phi-4-mini
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
PHI_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.02 * i for i in range(48)],
                "long_factor": [1.0 + 0.5 * i for i in range(48)]}
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e6}
# model -> (model_type, the published config's shape, layers kept)
FAMILIES = {
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                                   rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072), 2),
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                                   num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                                   rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072), 2),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                                   rope_parameters=QWEN_ROPE), 2),
    "qwen2.5-3b": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                                 rope_parameters=QWEN_ROPE), 2),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                                 rope_parameters=QWEN_ROPE), 2),
    "qwen3-4b": ("qwen3", dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                               rope_parameters=QWEN_ROPE), 2),
    "gemma-3-270m": ("gemma3_text", dict(hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                                         num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                         query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
                                         rope_theta=1e6, rope_local_base_freq=1e4), 6),
    "gemma-3-1b": ("gemma3_text", dict(hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                                       num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                       query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
                                       rope_theta=1e6, rope_local_base_freq=1e4), 6),
    "smollm2-360m": ("llama", dict(hidden_size=960, intermediate_size=2560, num_attention_heads=15,
                                   num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 100000.0}), 2),
    "smollm3-3b": ("smollm3", dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                                   num_key_value_heads=4, vocab_size=128256, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 5e6}), 4),
    "phi-3.5-mini": ("phi3", dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                                  num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=False,
                                  original_max_position_embeddings=4096, max_position_embeddings=131072,
                                  sliding_window=262144, rope_parameters=PHI_LONGROPE), 2),
    "phi-4-mini": ("phi3", dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                                num_key_value_heads=8, vocab_size=200064, tie_word_embeddings=True,
                                original_max_position_embeddings=4096, max_position_embeddings=131072,
                                rope_parameters={**PHI_LONGROPE, "partial_rotary_factor": 0.75}), 2),
}
N_TOKENS = 48
# llama.cpp's CPU GELU looks its values up in a float16 table: gemma3's logits drift by ~1e-3 per
# few layers from transformers' exact GELU (tests/test_converter.py measures 3e-4 to 8e-4 on 2-4)
MAX_REL_ERR = {"gemma3_text": 5e-3}


def check(name: str, work: Path, tokenizer_dir: Path) -> dict:
    import shutil

    import numpy as np
    import torch
    from llama_cpp import GGML_TYPE_F32, Llama
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgelora.converters.hf_to_gguf import convert
    from edgelora.quantize import quantize

    model_type, shape, layers = FAMILIES[name]
    hf = work / name
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, rms_norm_eps=1e-6, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=2, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.02 * torch.randn_like(p))
    model.save_pretrained(hf)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, hf / f)
    tokens = torch.randint(3, 49152, (N_TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = model.float()(torch.tensor([tokens])).logits[0].numpy()
    del model
    f32, q4 = work / f"{name}-f32.gguf", work / f"{name}-q4_k_m.gguf"
    t0 = time.perf_counter()
    convert(hf, f32, outtype="f32", card={"general.name": "family-check"})  # no "phi-3": SmolLM2's vocabulary
    seconds = time.perf_counter() - t0
    llm = Llama(model_path=str(f32), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, verbose=False)
    llm.eval(tokens)
    got = np.array(llm.scores[:N_TOKENS], dtype=np.float32)
    llm.close()
    info = quantize(f32, q4, "q4_k_m")
    shutil.rmtree(hf)
    f32.unlink()
    q4.unlink()
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    fell = info["fallbacks"]
    return {"name": name, "type": model_type, "hidden": shape["hidden_size"], "layers": layers,
            "convert_s": seconds, "rel_err": rel, "top1": top1, "q4_bpw": info["bpw"],
            "fallbacks": fell.get("count", 0), "fallback_types": fell.get("by_type", {}),
            "ok": rel < MAX_REL_ERR.get(model_type, 1e-3) and top1 >= 0.98}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"some of: {', '.join(FAMILIES)}")
    a = p.parse_args()
    names = a.names or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        sys.exit(f"unknown: {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    from edgelora.bases import materialise, resolve_base

    tokenizer_dir = materialise(resolve_base("smollm2-135m"))
    print("| model (shape, random weights) | model_type | hidden | layers kept | convert s | logits max rel err "
          "| top-1 | q4_k_m bits/weight | weights fallen back |\n|---|---|---:|---:|---:|---:|---:|---:|---|")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = check(name, Path(tmp), tokenizer_dir)
            fell = ", ".join(f"{t} x{n}" for t, n in r["fallback_types"].items()) or "none"
            print(f"| {name} | {r['type']} | {r['hidden']} | {r['layers']} | {r['convert_s']:.1f} | {r['rel_err']:.1e} "
                  f"| {r['top1']:.3f} | {r['q4_bpw']:.2f} | {fell} |", flush=True)
            if not r["ok"]:
                failed.append(name)
    print(f"\n{'PASS' if not failed else 'MISS'}  every family computes what transformers does (max rel err < 1e-3, "
          f"5e-3 for gemma3's GELU table; top-1 >= 0.98){': not ' + ', '.join(failed) if failed else ''}")


if __name__ == "__main__":
    main()
