"""Runtime overhead: generation tokens/s through edgelora's runtime against raw llama-cpp-python.

One process loads the same GGUF twice, once with `edgelora.runtime.load(...)` and once as a plain
`llama_cpp.Llama` (same n_ctx, threads and seed; loaded under edgelora's buffer-type policy,
`edgelora.llamacpp.model_params_policy`, since on CPUs that advertise AMX llama.cpp's AMX path
can crash on quantised weights, so both sides run the same kernels). Four ways of asking are
compared, each the same request on both sides:

    complete         Runtime.complete(prompt)              vs Llama.create_completion(prompt)
    complete+stream  Runtime.complete(prompt, stream=True) vs Llama.create_completion(prompt, stream=True)
    chat             Runtime.chat(messages)                vs Llama.create_chat_completion(messages)
    chat+stream      Runtime.chat(messages, stream=True)   vs Llama.create_chat_completion(messages, stream=True)

Decoding is greedy (temperature 0) with max_tokens=--tokens, and the prompts ask for a sequence
that does not end (counting), so every call generates exactly --tokens tokens: a raw, non-streamed
reference call per prompt must report --tokens generated tokens (else the script stops: pick
another --prompt / --chat-prompt for your model), every call on both sides must return the
reference's text, and in each timed pair llama.cpp must have evaluated as many tokens for both.
Streams are consumed to the end, pieces joined, on both sides.

The modes run one after the other. In each, both sides are warmed up once (untimed), then the
repeats alternate the order (A B, B A, ...). The table shows, per side, the median over the
repeats of tokens/s from the wall clock around the whole call (template rendering, prompt and
generation; the prompt is the one that side's previous call had, so llama-cpp-python reuses its
KV cache and evaluates about one prompt token) and of llama.cpp's own generation tokens/s (its
perf counters, as Runtime.timings() reads them; they count that one prompt token too). The ratio
is the median of the per-repeat wall-clock ratios edgelora/raw (each pair ran back to back, so
drifts in the machine's speed cancel). The exit status is 1 if a mode's ratio is below
--min-ratio (0.97, the target: the runtime costs at most 3% of generation speed).

    python benchmarks/runtime_overhead.py                                # SmolLM2-135M (embedded), 128 tokens
    python benchmarks/runtime_overhead.py --model my-q4_k_m.gguf --threads 4 --tokens 256 --repeats 7
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"
CHAT_PROMPT = "Write the numbers from 1 to 1000 separated by commas, without stopping."
MODES = ("complete", "complete+stream", "chat", "chat+stream")


def perf(llm) -> dict:
    """llama.cpp's counters for `llm`'s context since the last reset (what Runtime.timings() reads)."""
    import llama_cpp.llama_cpp as C

    from edgelora.llamacpp import handles

    t = C.llama_perf_context(handles(llm)[1])
    return {"gen_tokens": t.n_eval, "gen_tok_s": t.n_eval / t.t_eval_ms * 1e3 if t.t_eval_ms else 0.0}


def edgelora_call(rt, mode: str, a) -> tuple[str, dict]:
    kw = dict(max_tokens=a.tokens, temperature=0.0, stream=mode.endswith("+stream"))
    if mode.startswith("chat"):
        out = rt.chat([{"role": "user", "content": a.chat_prompt}], **kw)
    else:
        out = rt.complete(a.prompt, **kw)
    text = out if isinstance(out, str) else "".join(out)
    return text, rt.timings()


def raw_call(llm, mode: str, a) -> tuple[str, dict]:
    import llama_cpp.llama_cpp as C

    from edgelora.llamacpp import handles

    C.llama_perf_context_reset(handles(llm)[1])  # so the counters cover this call only, as Runtime does
    stream = mode.endswith("+stream")
    kw = dict(max_tokens=a.tokens, temperature=0.0, top_p=0.95, seed=a.seed, stream=stream)
    if mode.startswith("chat"):
        out = llm.create_chat_completion(messages=[{"role": "user", "content": a.chat_prompt}], **kw)
        text = ("".join(c["choices"][0]["delta"].get("content") or "" for c in out) if stream
                else out["choices"][0]["message"]["content"])
    else:
        out = llm.create_completion(a.prompt, **kw)
        text = "".join(c["choices"][0]["text"] for c in out) if stream else out["choices"][0]["text"]
    return text, perf(llm)


def reference_call(llm, kind: str, a) -> tuple[str, int]:
    """The greedy answer and its generated-token count (usage.completion_tokens), raw, not streamed."""
    kw = dict(max_tokens=a.tokens, temperature=0.0, top_p=0.95, seed=a.seed)
    if kind == "chat":
        out = llm.create_chat_completion(messages=[{"role": "user", "content": a.chat_prompt}], **kw)
        return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]
    out = llm.create_completion(a.prompt, **kw)
    return out["choices"][0]["text"], out["usage"]["completion_tokens"]


def timed(fn, *args) -> dict:
    t0 = time.perf_counter()
    text, counters = fn(*args)
    wall = time.perf_counter() - t0
    return {"text": text, "wall_s": wall, **counters}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file [default: the embedded SmolLM2-135M-Instruct Q4_1]")
    p.add_argument("--threads", type=int, default=max(multiprocessing.cpu_count() // 2, 1),
                   help="CPU threads for both sides [default: llama-cpp-python's default, half the cores]")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side and mode (median reported)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=PROMPT, help="completion prompt (must not end before --tokens)")
    p.add_argument("--chat-prompt", default=CHAT_PROMPT, help="chat question (must not end before --tokens)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--min-ratio", type=float, default=0.97, help="exit 1 if a mode's ratio edgelora/raw is lower")
    a = p.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown mode(s): {', '.join(sorted(unknown))}")

    import llama_cpp

    from edgelora.llamacpp import model_params_policy, use_extra_bufts
    from edgelora.runtime import load

    if a.model:
        model = Path(a.model)
    else:
        from edgelora.bases import resolve_base

        model = resolve_base("smollm2-135m").path
    rt = load(model, device="cpu", n_ctx=a.n_ctx, threads=a.threads, seed=a.seed)
    with model_params_policy():
        raw = llama_cpp.Llama(model_path=str(model), n_ctx=a.n_ctx, n_threads=a.threads, n_threads_batch=a.threads,
                              n_gpu_layers=0, seed=a.seed, verbose=False)
    assert rt.llm.n_ctx() == raw.n_ctx(), (rt.llm.n_ctx(), raw.n_ctx())
    sides = {"edgelora": lambda m: timed(edgelora_call, rt, m, a), "raw": lambda m: timed(raw_call, raw, m, a)}
    print(f"model {model.name} | CPU, {a.threads} threads, n_ctx {a.n_ctx} | {a.tokens} tokens per call, "
          f"greedy | median of {a.repeats} | llama-cpp-python {llama_cpp.__version__}, extra buffer types "
          f"{'on' if use_extra_bufts() else 'off (the CPU advertises AMX)'}", flush=True)

    # The reference answer per kind: raw, not streamed; its usage says how many tokens were generated.
    reference = {}
    for kind in sorted({m.split("+")[0] for m in modes}):
        text, usage = reference_call(raw, kind, a)
        if usage != a.tokens:
            sys.exit(f"{kind}: generation stopped after {usage} of {a.tokens} tokens; give a prompt that keeps "
                     f"going (--prompt / --chat-prompt)")
        reference[kind] = text

    def check(mode: str, side: str, res: dict) -> None:
        if res["text"] != reference[mode.split("+")[0]]:
            sys.exit(f"{mode}/{side}: the answer differs from the reference ({len(res['text'])} characters)")

    results: dict[str, dict[str, list[dict]]] = {m: {"edgelora": [], "raw": []} for m in modes}
    for mode in modes:
        for side, run in sides.items():  # warm-up, untimed: puts this mode's prompt in each side's KV cache
            check(mode, side, run(mode))
        for rep in range(a.repeats):
            for side in (("edgelora", "raw") if rep % 2 == 0 else ("raw", "edgelora")):
                res = sides[side](mode)
                check(mode, side, res)
                results[mode][side].append(res)
            e, r = results[mode]["edgelora"][-1], results[mode]["raw"][-1]
            if e["gen_tokens"] != r["gen_tokens"]:
                sys.exit(f"{mode}: llama.cpp evaluated {e['gen_tokens']} tokens for edgelora, {r['gen_tokens']} for raw")
        print(f"  {mode:16s} " + " ".join(f"{a.tokens / e['wall_s']:.1f}/{a.tokens / r['wall_s']:.1f}" for e, r in
                                          zip(results[mode]["edgelora"], results[mode]["raw"]))
              + " tok/s (edgelora/raw, each repeat)", flush=True)

    print("\n| mode | edgelora tok/s | raw tok/s | ratio | edgelora llama.cpp gen tok/s | raw llama.cpp gen tok/s |")
    print("|---|---|---|---|---|---|")
    worst = float("inf")
    for mode in modes:
        wall = {s: a.tokens / statistics.median(x["wall_s"] for x in results[mode][s]) for s in sides}
        own = {s: statistics.median(x["gen_tok_s"] for x in results[mode][s]) for s in sides}
        # The median of the per-repeat ratios: each pair ran back to back, so slow drifts of the
        # machine's speed cancel within a pair.
        ratio = statistics.median(r["wall_s"] / e["wall_s"] for e, r in zip(results[mode]["edgelora"],
                                                                            results[mode]["raw"]))
        worst = min(worst, ratio)
        print(f"| {mode} | {wall['edgelora']:.1f} | {wall['raw']:.1f} | {ratio:.3f} | {own['edgelora']:.1f} | "
              f"{own['raw']:.1f} |")
    verdict = "OK" if worst >= a.min_ratio else "BELOW TARGET"
    print(f"\nlowest ratio edgelora/raw: {worst:.3f} (target >= {a.min_ratio}): {verdict}")
    return 0 if worst >= a.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
