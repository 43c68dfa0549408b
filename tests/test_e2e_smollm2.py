"""End to end on the embedded default base (SmolLM2-135M-Instruct): real model, CPU QLoRA."""
import json
from pathlib import Path

import pytest
import torch

from edgelora.config import load_config
from edgelora.trainer import train
from test_models import needs_smollm2

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
pytestmark = [pytest.mark.slow, needs_smollm2]


def _answer(model, tok, messages) -> str:
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    return tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_qlora_on_cpu_learns_the_task_and_changes_answers(tmp_path):
    eval_rows = [json.loads(line) for line in (EXAMPLES / "extract_eval.jsonl").read_text().splitlines()][:16]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    cfg = load_config(None, dict(base="smollm2-135m", data=str(EXAMPLES / "extract_train.jsonl"), eval_data=str(eval_file),
                                 out=str(tmp_path / "run"), max_steps=24, batch_size=4, lr=1e-3, seq_len=256,
                                 eval_every=12, method="qlora"))
    res = train(cfg)
    s = res.summary
    assert s["method"] == "qlora" and s["device"] == "cpu"
    assert s["final_eval_loss"] < 0.5 * s["first_eval_loss"], s

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter")
    base = AutoModelForCausalLM.from_pretrained(s["base_hf_dir"])
    prompts = [r["messages"][:1] for r in eval_rows[:4]]
    expected = [json.loads(r["messages"][1]["content"]) for r in eval_rows[:4]]
    before = [_answer(base, tok, m) for m in prompts]
    tuned = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")  # plain PEFT, no edgelora code
    after = [_answer(tuned, tok, m) for m in prompts]
    assert before != after
    parsed = [json.loads(a) if a.startswith("{") else None for a in after]
    assert sum(p is not None and set(p) == {"name", "city", "year"} for p in parsed) >= 3, after
    assert sum(p == e for p, e in zip(parsed, expected)) >= 2, (after, expected)
