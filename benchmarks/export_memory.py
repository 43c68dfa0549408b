"""Export memory and time: edgelora's streaming merge+convert against the usual two-step route.

For random llama-shaped models of growing size (bf16 safetensors, a tiny BPE tokenizer, and a
random rank-16 PEFT LoRA adapter on every linear layer of every block), both routes write the
same merged f16 GGUF:

  edgelora   converters.hf_to_gguf.convert(model, out, adapter_dir=adapter): each tensor is
             read, merged with its LoRA pair, written and dropped, one at a time;
  two-step   (1) transformers from_pretrained + PeftModel.merge_and_unload + save_pretrained of
             a merged bf16 checkpoint, then (2) a converter run on that checkpoint. Our own
             converter stands in for llama.cpp's convert_hf_to_gguf.py in step 2 (it cannot be
             run here), so step 2 is if anything cheaper than what users really run.

Every measured step runs in its own process, so its peak RSS (ru_maxrss, which counts mapped
file pages it touched) is its own; "baseline" is that process's RSS right after its imports.
Times are the work only, without interpreter start-up and imports. For the smallest model the
two GGUFs are compared tensor by tensor, so the sides are known to do the same job.

    python benchmarks/export_memory.py                          # 0.1b, 0.5b, 1b; a temp work dir
    python benchmarks/export_memory.py --work /tmp/em --sizes 0.1b,1b --json em.json

--work keeps the generated models (about 3.5 GB for all three sizes) so reruns skip generation;
the GGUFs and the intermediate merged checkpoint are deleted as soon as they are measured.
A whole run takes 1 to 3 minutes on 2 CPU cores (plus about 1 minute to generate the models). On
a machine busy with other work, set OMP_NUM_THREADS=1: torch's threads otherwise spin against the
other work, and the many small merge operations make times vary 2-8x from run to run.

What to expect: the two-step route's peak grows with the model (step 1 holds all of it), while
edgelora's stays near its baseline at every size: large tensors are read, merged and written in
row blocks of about 8 MiB (converters/gguf_stream.py), so neither the model nor its largest
tensor (the Qwen2.5-shaped 0.5b has a 152k x 896 embedding) is ever held whole.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Shapes of real models (llama architecture throughout; SmolLM2 and Qwen2.5 tie the embeddings).
SIZES: dict[str, dict] = {
    "0.1b": {"like": "SmolLM2-135M", "hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9,
             "kv_heads": 3, "vocab": 49152, "tie": True},
    "0.5b": {"like": "Qwen2.5-0.5B", "hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14,
             "kv_heads": 2, "vocab": 151936, "tie": True},
    "1b": {"like": "TinyLlama-1.1B", "hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32,
           "kv_heads": 4, "vocab": 32000, "tie": False},
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32
SHARD_BYTES = 1 << 30


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- the random models -------------------------------------------------------------------------

def tensor_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a llama checkpoint with the shape `s`."""
    h, i, head_dim = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (s["vocab"], h)}
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    shapes["model.norm.weight"] = (h,)
    if not s["tie"]:
        shapes["lm_head.weight"] = (s["vocab"], h)
    return shapes


def n_params(s: dict) -> int:
    return sum(_numel(shape) for shape in tensor_shapes(s).values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def generate(size: str, work: Path) -> dict:
    """Write (once) the model and adapter folders of `size` under `work`; return their paths."""
    model_dir, adapter_dir = work / size / "model", work / size / "adapter"
    done = work / size / "done"
    if not done.exists():
        shutil.rmtree(work / size, ignore_errors=True)
        write_model(SIZES[size], model_dir)
        write_adapter(SIZES[size], model_dir, adapter_dir)
        done.touch()
    return {"model": str(model_dir), "adapter": str(adapter_dir)}


def write_model(s: dict, out: Path) -> None:
    """config.json, the test tokenizer, and N(0, 0.02) bf16 weights in 1 GiB shards, a shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tokenizer

    out.mkdir(parents=True)
    tok = build_tokenizer(out)  # 512 tokens; the converter writes [PADn] for the embedding rows above
    LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=s["tie"],
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                dtype="bfloat16").save_pretrained(out)
    shards: list[list[tuple[str, tuple]]] = [[]]
    used = 0
    for name, shape in tensor_shapes(s).items():
        if used and used + 2 * _numel(shape) > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += 2 * _numel(shape)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (1 + 0.1 * torch.randn(shape, generator=gen) if len(shape) == 1
                          else 0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
                   for name, shape in shard}
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: file for name, _ in shard})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_adapter(s: dict, model_dir: Path, out: Path) -> None:
    """A PEFT LoRA folder as PEFT saves it, with random A and a non-zero B (as after training)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), task_type="CAUSAL_LM",
               base_model_name_or_path=str(model_dir)).save_pretrained(out)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in tensor_shapes(s).items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            key = f"base_model.model.{module}"
            tensors[key + ".lora_A.weight"] = 0.02 * torch.randn(RANK, shape[1], generator=gen)
            tensors[key + ".lora_B.weight"] = 0.02 * torch.randn(shape[0], RANK, generator=gen)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})


# --- the measured steps, each run in a process of its own ---------------------------------------

def child_edgelora(p: dict) -> dict:
    from converters.hf_to_gguf import convert

    baseline, t0 = rss_mb(), time.perf_counter()
    convert(p["model"], p["out"], adapter_dir=p["adapter"], outtype="f16")
    return {"seconds": time.perf_counter() - t0, "baseline_mb": baseline, "peak_mb": rss_mb()}


def child_merge(p: dict) -> dict:
    """Two-step, step 1: what the PEFT docs show for merging an adapter into its base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    baseline, t0 = rss_mb(), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, p["adapter"]).merge_and_unload()
    model.save_pretrained(p["out"])
    AutoTokenizer.from_pretrained(p["model"]).save_pretrained(p["out"])
    return {"seconds": time.perf_counter() - t0, "baseline_mb": baseline, "peak_mb": rss_mb()}


def child_convert(p: dict) -> dict:
    """Two-step, step 2: the merged checkpoint to GGUF (stand-in for convert_hf_to_gguf.py)."""
    from converters.hf_to_gguf import convert

    baseline, t0 = rss_mb(), time.perf_counter()
    convert(p["model"], p["out"], outtype="f16")
    return {"seconds": time.perf_counter() - t0, "baseline_mb": baseline, "peak_mb": rss_mb()}


def child_compare(p: dict) -> dict:
    """Both GGUFs tensor by tensor. The two-step route rounds each merged weight to bf16 before
    it becomes f16 (edgelora merges in f32), so adapted weights may differ by about a bf16 step."""
    import numpy as np
    from gguf import GGUFReader

    a, b = GGUFReader(p["a"]), GGUFReader(p["b"])
    kv = {r: {k: f.contents() for k, f in r.fields.items() if k != "general.name" and not k.startswith("GGUF.")}
          for r in (a, b)}
    tb = {t.name: t for t in b.tensors}
    same_layout = [t.name for t in a.tensors] == list(tb) and all(
        t.tensor_type == tb[t.name].tensor_type and list(t.shape) == list(tb[t.name].shape) for t in a.tensors)
    identical, worst = 0, 0.0  # worst: max |a - b| of a tensor, over 2^-8 (bf16's step) * max |a|
    for t in a.tensors:
        x, y = np.asarray(t.data, np.float32), np.asarray(tb[t.name].data, np.float32)
        identical += bool(np.array_equal(x, y))
        worst = max(worst, float(np.abs(x - y).max() / (2**-8 * np.abs(x).max())))
    return {"tensors": len(a.tensors), "identical": identical, "worst_in_bf16_steps": worst,
            "same_metadata": kv[a] == kv[b], "same_layout": same_layout,
            "ok": same_layout and kv[a] == kv[b] and worst <= 1.0}


def child_generate(p: dict) -> dict:
    return generate(p["size"], Path(p["work"]))


CHILDREN = {"edgelora": child_edgelora, "merge": child_merge, "convert": child_convert,
            "compare": child_compare, "generate": child_generate}


def run_child(kind: str, **params) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--params", json.dumps(params)]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{kind} {params} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


# --- one size, both routes --------------------------------------------------------------------

def measure(size: str, work: Path, compare: bool, repeats: int) -> dict:
    """Both routes on one size, `repeats` times each (alternating); the fastest time and lowest peak are kept."""
    paths = run_child("generate", size=size, work=str(work))
    s, model, adapter = SIZES[size], paths["model"], paths["adapter"]
    res = {"size": size, "like": s["like"], "params": n_params(s),
           "disk_bytes": sum(f.stat().st_size for f in Path(model).glob("*.safetensors")),
           "largest_tensor_bytes": 2 * max(_numel(shape) for shape in tensor_shapes(s).values())}
    print(f"{size} ({s['like']}-shaped, {res['params'] / 1e9:.2f}B params)", flush=True)
    runs: dict[str, list[dict]] = {"edgelora": [], "merge": [], "convert": []}
    out = work / "out"
    for r in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        a_gguf, merged, b_gguf = out / "edgelora.gguf", out / "merged", out / "two_step.gguf"
        for step in (("edgelora", "two-step") if r % 2 == 0 else ("two-step", "edgelora")):
            if step == "edgelora":
                runs["edgelora"].append(run_child("edgelora", model=model, adapter=adapter, out=str(a_gguf)))
                res["gguf_bytes"] = a_gguf.stat().st_size
            else:
                runs["merge"].append(run_child("merge", model=model, adapter=adapter, out=str(merged)))
                runs["merge"][-1]["checkpoint_bytes"] = dir_bytes(merged)
                runs["convert"].append(run_child("convert", model=str(merged), out=str(b_gguf)))
                shutil.rmtree(merged)
        for name, label in (("edgelora", "edgelora      "), ("merge", "step 1 merge  "), ("convert", "step 2 convert")):
            print(f"  {label} {runs[name][-1]['seconds']:6.1f} s  peak {runs[name][-1]['peak_mb']:6.0f} MB", flush=True)
        if compare and r == 0:
            res["compare"] = run_child("compare", a=str(a_gguf), b=str(b_gguf))
        shutil.rmtree(out)
    for name, rs in runs.items():
        res[name] = {**rs[0], "seconds": min(x["seconds"] for x in rs), "peak_mb": min(x["peak_mb"] for x in rs),
                     "all_seconds": [x["seconds"] for x in rs], "all_peak_mb": [x["peak_mb"] for x in rs]}
    return res


def two_step(r: dict) -> tuple[float, float]:
    """(peak RSS, time) of the two-step route: its steps run one after the other."""
    return max(r["merge"]["peak_mb"], r["convert"]["peak_mb"]), r["merge"]["seconds"] + r["convert"]["seconds"]


# --- the report ------------------------------------------------------------------------------

def report(results: list[dict]) -> None:
    def gb(n: int) -> str:
        return f"{n / 1e9:.2f}"

    print("\nMerged f16 GGUF from a bf16 model + rank-16 LoRA on all linear layers (peak RSS in MB, time in s)\n")
    print("| model | params | GB on disk | edgelora peak RSS | edgelora time | two-step peak RSS | two-step time "
          "| RSS ratio two-step / edgelora |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        rss, secs = two_step(r)
        e = r["edgelora"]
        print(f"| {r['size']} ({r['like']}) | {gb(r['params'])}B | {gb(r['disk_bytes'])} | {e['peak_mb']:.0f} "
              f"| {e['seconds']:.1f} | {rss:.0f} | {secs:.1f} | {rss / e['peak_mb']:.2f} |")
    print("\nTwo-step route by step; RSS after imports (baseline) and the largest single tensor (bf16)\n")
    print("| model | step 1 merge RSS | step 1 time | merged checkpoint GB | step 2 convert RSS | step 2 time "
          "| baseline edgelora / merge / convert | largest tensor MB |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        m, c, e = r["merge"], r["convert"], r["edgelora"]
        print(f"| {r['size']} | {m['peak_mb']:.0f} | {m['seconds']:.1f} | {gb(m['checkpoint_bytes'])} "
              f"| {c['peak_mb']:.0f} | {c['seconds']:.1f} "
              f"| {e['baseline_mb']:.0f} / {m['baseline_mb']:.0f} / {c['baseline_mb']:.0f} "
              f"| {r['largest_tensor_bytes'] / 2**20:.0f} |")
    if len(results) > 1:
        lo, hi = min(results, key=lambda r: r["params"]), max(results, key=lambda r: r["params"])
        grew = (hi["disk_bytes"] - lo["disk_bytes"]) / 2**20
        print(f"\nFrom {lo['size']} to {hi['size']} the model grew by {grew:.0f} MB on disk "
              f"(x{hi['params'] / lo['params']:.1f} params); peak RSS grew by")
        for name, peak in (("edgelora", lambda r: r["edgelora"]["peak_mb"]), ("two-step", lambda r: two_step(r)[0])):
            d = peak(hi) - peak(lo)
            print(f"  {name:9s} {d:+6.0f} MB ({peak(lo):.0f} -> {peak(hi):.0f}), "
                  f"{100 * d / grew:.0f}% of the model's growth")
        flat = max(r["edgelora"]["peak_mb"] for r in results) - min(r["edgelora"]["peak_mb"] for r in results)
        print(f"edgelora's peak RSS {'stays flat' if flat < 0.1 * grew else 'is NOT flat'}: it spans {flat:.0f} MB "
              f"over all sizes (flat = under 10% of the model's growth).")
    above = {r["size"]: (r["edgelora"]["peak_mb"] - r["edgelora"]["baseline_mb"]) / (r["largest_tensor_bytes"] / 2**20)
             for r in results}
    print("edgelora's peak above its baseline, in largest tensors: "
          + ", ".join(f"{size} {x:.1f}x" for size, x in above.items()))
    for r in results:
        if "compare" in r:
            c = r["compare"]
            print(f"\nEquivalence ({r['size']}): {'OK' if c['ok'] else 'MISMATCH'}: {c['tensors']} tensors, same names/"
                  f"types/shapes {c['same_layout']}, same metadata (but general.name) {c['same_metadata']}, "
                  f"{c['identical']} bit-identical; the others within {c['worst_in_bf16_steps']:.2f} bf16 step(s) "
                  f"of the tensor's largest value (two-step rounds merged weights to bf16)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.1b,0.5b,1b", help=f"comma-separated, from {', '.join(SIZES)}")
    p.add_argument("--work", help="where the generated models are kept between runs (default: a temp dir)")
    p.add_argument("--repeats", type=int, default=1, help="run each route this many times; keep the best")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        sys.path.insert(0, str(ROOT))
        print("RESULT " + json.dumps(CHILDREN[a.child](json.loads(a.params))), flush=True)
        return

    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown size {unknown[0]!r}; choose from {', '.join(SIZES)}")
    sizes.sort(key=lambda s: n_params(SIZES[s]))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="export_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = [measure(size, work, compare=(i == 0), repeats=a.repeats) for i, size in enumerate(sizes)]
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    report(results)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    if not all(r["compare"]["ok"] for r in results if "compare" in r):
        sys.exit("the two routes' GGUFs differ: the comparison above is not like for like")


if __name__ == "__main__":
    main()
