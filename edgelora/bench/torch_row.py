"""The bench's torch row: the HF base + PEFT adapter, the unquantised model the GGUFs come from.

Kept apart from the rest of edgelora.bench so that benching GGUF files needs no torch (the
`train` extra); it runs in its own process like every other row.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..machine import peak_rss_mb
from .candidates import Candidate, Settings
from .gguf_row import SPEED_EXAMPLES
from .scoring import Compare, rate, task_result

BATCH = 16  # prompts generated together after the ones timed


def measure_hf(c: Candidate, rows: list[dict], s: Settings, scratch: Path, tick) -> dict:
    """The unquantised reference: the HF base (as training saw it) + the PEFT adapter, in torch
    (fp32 on CPU, bf16 on CUDA), fed the reference's token ids."""
    import torch

    from ..hf_model import compute_dtype, load_tokenizer, load_with_adapter, pick_device
    from ..bases import base_hash, materialise, resolve_base

    if s.threads:
        torch.set_num_threads(s.threads)
    device = pick_device(s.device)
    base = resolve_base(c.model)
    hf_dir = materialise(base, base_hash(base))
    t0 = time.perf_counter()
    model = load_with_adapter(hf_dir, Path(c.loras[0]), device, compute_dtype(device))
    load_s = time.perf_counter() - t0
    tok = load_tokenizer(c.loras[0])
    tokens = json.loads((scratch / "tokens.json").read_text())
    stops = sorted({a[-1] for _, a in tokens} | {tok.eos_token_id})  # the end-of-turn tokens the answers close with

    def generate(prompts: list[list[int]]) -> list[list[int]]:  # greedy, left-padded together, each cut at its stop
        width = max(map(len, prompts))
        ids = torch.tensor([[stops[0]] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=s.max_tokens, do_sample=False,
                             eos_token_id=stops, pad_token_id=stops[0])[:, width:]
        return [row[:next((j + 1 for j, t in enumerate(row) if t in stops), len(row))] for row in out.tolist()]

    prompts = [prompt for prompt, _ in tokens]
    alone = prompts[:SPEED_EXAMPLES + 1]  # one at a time for the speed, the first not counted (see gguf_row)
    generated, gen_tokens, gen_s = [], 0, 0.0
    with torch.no_grad():
        for i, prompt in enumerate(alone):
            t = time.perf_counter()
            generated += generate([prompt])
            if i or len(alone) == 1:
                gen_s, gen_tokens = gen_s + time.perf_counter() - t, gen_tokens + len(generated[-1])
            tick()
        for start in range(len(alone), len(prompts), BATCH):
            generated += generate(prompts[start:start + BATCH])
            for _ in prompts[start:start + BATCH]:
                tick()
        answers = [tok.decode(ids, skip_special_tokens=True) for ids in generated]
        peak = peak_rss_mb()
        cmp = Compare(scratch, False, sum(len(a) for _, a in tokens), model.config.vocab_size)
        n_prompt, prompt_s = 0, 0.0
        for prompt, answer in tokens:
            t = time.perf_counter()
            logits = model(torch.tensor([prompt + answer], device=device)).logits[0, len(prompt) - 1:-1]
            prompt_s += time.perf_counter() - t
            n_prompt += len(prompt) + len(answer)
            cmp.add(logits.float().cpu().numpy(), answer)
            tick()
    size = sum(f.stat().st_size for f in Path(hf_dir).glob("*.safetensors"))
    adapter_size = sum(f.stat().st_size for f in Path(c.loras[0]).glob("*.safetensors"))
    n_params = sum(p.numel() for p in model.get_base_model().parameters())
    return dict(load_s=load_s, peak_rss_mb=peak, answers=answers, **task_result(s.score, s.pattern, answers, rows),
                **cmp.result(),
                prompt_tok_s=rate(n_prompt, prompt_s),
                gen_tok_s=rate(gen_tokens, gen_s), device=f"torch {device}", size_bytes=size + adapter_size,
                bpw=(size + adapter_size) * 8 / n_params)
