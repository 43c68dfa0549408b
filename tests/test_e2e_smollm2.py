"""End to end on the embedded default base (SmolLM2-135M-Instruct): CPU QLoRA, then GGUF export
checked through llama.cpp."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgelora import quant_presets
from edgelora.config import load_config
from edgelora.exporter import export
from edgelora.llamacpp import load_llama
from edgelora.trainer import train
from tiny import needs_smollm2

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
pytestmark = [pytest.mark.slow, needs_smollm2]
EVAL_ROWS = [json.loads(line) for line in (EXAMPLES / "extract_eval.jsonl").read_text().splitlines()][:16]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smol")
    eval_file = tmp / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    cfg = load_config(None, dict(base="smollm2-135m", data=str(EXAMPLES / "extract_train.jsonl"), eval_data=str(eval_file),
                                 out=str(tmp / "smol-extract"), max_steps=32, batch_size=8, lr=1e-3, seq_len=256,
                                 eval_every=16, method="qlora"))
    return train(cfg)


def _answer(model, tok, messages) -> str:
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    return tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _score(answers) -> int:
    expected = [json.loads(r["messages"][1]["content"]) for r in EVAL_ROWS[:len(answers)]]
    parsed = [json.loads(a) if a.startswith("{") and a.endswith("}") else None for a in answers]
    return sum(p == e for p, e in zip(parsed, expected))


def test_qlora_on_cpu_learns_the_task_and_changes_answers(smol_run):
    s = smol_run.summary
    assert s.method == "qlora" and s.device == "cpu"
    assert s.final_eval_loss < 0.5 * s.first_eval_loss, s

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_run.run_dir / "adapter")
    base = AutoModelForCausalLM.from_pretrained(s.base_hf_dir)
    prompts = [r["messages"][:1] for r in EVAL_ROWS[:4]]
    before = [_answer(base, tok, m) for m in prompts]
    tuned = PeftModel.from_pretrained(base, smol_run.run_dir / "adapter")  # plain PEFT, no edgelora code
    after = [_answer(tuned, tok, m) for m in prompts]
    assert before != after
    assert _score(after) >= 3, after
    assert _score(before) <= 1, before


def _logits(path, tokens, lora=None):
    llm = load_llama(path, lora_path=str(lora) if lora else None, n_ctx=256, logits_all=True, verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float64)


def _kl(p_logits, q_logits) -> float:
    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_export_ladder_and_lora_gguf_run_in_llama_cpp(smol_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = export(str(smol_run.run_dir), quants=["all"], lora_gguf=True)
    out = res.out_dir
    roles = {str(f.role): f for f in res.files}
    # Verified on the run's own examples: the f16 against torch, SmolLM2's template, <|im_end|>, BOS
    # and stopping for the smallest merged file and the LoRA route, which must land on the merged f16.
    checks = json.loads((out / "manifest.json").read_text())["checks"]
    token = ["template", "end_of_turn", "bos", "stops"]
    assert [(c["file"], c["name"], c["passed"]) for c in checks] == [
        ("smol-extract-f16.gguf", "logits", True), ("smol-extract-f16.gguf", "adapter", True),
        *[("smol-extract-q2_k.gguf", n, True) for n in token],
        *[("smol-extract-lora-f16.gguf", n, True) for n in token + ["lora_route"]]], checks
    assert "'<|im_end|>' (2)" in checks[3]["figure"]
    assert set(roles) == {"merged:f16", "merged:q8_0", "merged:q4_k_m", "merged:q2_k", "lora"}
    for q in ("f16", "q8_0", "q4_k_m", "q2_k"):
        lo, hi = quant_presets.load(q)["expected_bpw"]
        assert lo <= roles[f"merged:{q}"].bpw <= hi, roles[f"merged:{q}"]
    sizes = [roles[f"merged:{q}"].size_bytes for q in ("q2_k", "q4_k_m", "q8_0", "f16")]
    assert sizes == sorted(sizes)
    # The base was a GGUF already: the LoRA route's Modelfile points at it rather than a copy.
    base_gguf = Path(smol_run.summary.base_path)
    assert (out / "Modelfile.lora").read_text().splitlines()[2:4] == [
        f"FROM {base_gguf}", "ADAPTER ./smol-extract-lora-f16.gguf"]
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in (out / "Modelfile").read_text()

    tok = AutoTokenizer.from_pretrained(smol_run.run_dir / "adapter")
    tokens = tok.apply_chat_template(EVAL_ROWS[0]["messages"], tokenize=True, return_dict=False)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol_run.summary.base_hf_dir),
                                       smol_run.run_dir / "adapter").merge_and_unload()
    with torch.no_grad():
        ref = merged(torch.tensor([tokens])).logits[0].double().numpy()
    f16 = _logits(out / "smol-extract-f16.gguf", tokens)
    assert np.abs(f16 - ref).max() <= 1e-2 * np.abs(ref).max()
    assert (f16.argmax(-1) == ref.argmax(-1)).mean() >= 0.98
    kl = {q: _kl(f16, _logits(out / f"smol-extract-{q}.gguf", tokens)) for q in ("q8_0", "q4_k_m", "q2_k")}
    assert kl["q8_0"] < kl["q4_k_m"] < kl["q2_k"], kl
    lora_route = _logits(base_gguf, tokens, lora=out / "smol-extract-lora-f16.gguf")
    assert (lora_route.argmax(-1) == f16.argmax(-1)).mean() >= 0.9
    assert _kl(f16, lora_route) < kl["q2_k"]

    # The laptop file answers the task through llama.cpp's own chat template handling.
    llm = load_llama(out / "smol-extract-q4_k_m.gguf", n_ctx=512, verbose=False)
    answers = [llm.create_chat_completion(messages=r["messages"][:1], temperature=0.0, max_tokens=40)
               ["choices"][0]["message"]["content"].strip() for r in EVAL_ROWS[:4]]
    assert _score(answers) >= 3, answers
