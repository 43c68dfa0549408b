"""Quantisation through llama.cpp's own quantiser, and GGUF inspection.

A tiny random llama (hidden 256, so every weight row fits the 256-wide K-quant blocks) is
converted to f16 once and quantised with each preset; llama.cpp loads every file back and its
logits are compared with the f16 file's. A second tiny model with hidden 192 shows fallbacks.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgelora import quant_presets
from edgelora.converters.hf_to_gguf import convert, convert_lora
from edgelora.errors import EdgeloraError
from edgelora.gguf_info import format_inspect, inspect_gguf
from edgelora.quantize import main_type, quantize
from tiny import build_model, llama_logits, needs_smollm2

PRESETS = ["f16", "q8_0", "q4_k_m", "q2_k"]
# Types llama.cpp's mix gives 2-D weights whose rows fit the blocks (q4_k_m: some attn_v /
# ffn_down and the output at Q6_K; q2_k: attn_v, attn_output, ffn_down at Q3_K, output at Q6_K).
MIX = {"f16": {"F16"}, "q8_0": {"Q8_0"}, "q4_k_m": {"Q4_K", "Q6_K"}, "q2_k": {"Q2_K", "Q3_K", "Q6_K"}}
TEXT = b"The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is."


def mean_kl(ref: np.ndarray, other: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(other))."""
    lp = ref - np.logaddexp.reduce(ref, axis=1, keepdims=True)
    lq = other - np.logaddexp.reduce(other, axis=1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def bpw_from_types(info: dict) -> float:
    """Bits per weight recomputed from each tensor's type and element count (ggml block sizes)."""
    bits = 0
    for t in info["tensors"]:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t["type"]]]
        bits += t["n_elements"] // block * size * 8
    return bits / info["n_params"]


def folder_names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def f16_file(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("quant") / "tiny-f16-src.gguf"
    convert(tiny_llama, out, outtype="f16")
    return out


@pytest.fixture(scope="module")
def quantised(f16_file) -> dict[str, tuple[Path, dict]]:
    results = {}
    for preset in PRESETS:
        dst = f16_file.parent / f"tiny-{preset}.gguf"
        results[preset] = dst, quantize(f16_file, dst, preset)
    return results


@pytest.fixture(scope="module")
def odd_f16(tmp_path_factory, tiny_tokenizer) -> Path:
    """A model whose hidden (192) and intermediate (384) sizes are not multiples of 256."""
    root = tmp_path_factory.mktemp("odd")
    model = build_model(root / "hf", tokenizer=tiny_tokenizer, hidden=192, intermediate=384, heads=4, kv_heads=2)
    convert(model, root / "odd-f16.gguf")
    return root / "odd-f16.gguf"


# ---------------------------------------------------------------- presets

@pytest.mark.parametrize("preset", PRESETS)
def test_preset_file_loads_in_llama_cpp_with_the_expected_types(quantised, preset):
    path, result = quantised[preset]
    logits = llama_logits(path, text=TEXT)
    assert logits.shape[1] == 505 and np.isfinite(logits).all()
    info = inspect_gguf(path)
    assert info["file_type"] == result["file_type"] == quant_presets.load(preset)["llama_ftype"]
    weights = [t for t in info["tensors"] if len(t["shape"]) == 2]
    assert weights and all(t["shape"][0] % 256 == 0 for t in weights)  # every row fits a K-quant block
    assert {t["type"] for t in weights} <= MIX[preset], info["tensor_types"]
    assert {t["type"] for t in info["tensors"] if len(t["shape"]) == 1} == {"F32"}  # norms stay f32
    assert result["fallbacks"] == {"count": 0, "by_type": {}, "tensors": []}
    assert result["tensor_types"] == info["tensor_types"] and result["size_bytes"] == path.stat().st_size


@pytest.mark.parametrize("preset", PRESETS)
def test_bits_per_weight_within_the_preset_range(quantised, preset):
    _, result = quantised[preset]
    lo, hi = quant_presets.load(preset)["expected_bpw"]
    assert lo <= result["bpw"] <= hi, result["bpw"]
    assert result["bpw"] == pytest.approx(bpw_from_types(inspect_gguf(result["path"])))


def test_sizes_and_quality_follow_the_bits(quantised):
    sizes = [quantised[p][1]["size_bytes"] for p in PRESETS]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes
    ref = llama_logits(quantised["f16"][0], text=TEXT)
    kl = {p: mean_kl(ref, llama_logits(quantised[p][0], text=TEXT)) for p in ("q8_0", "q4_k_m", "q2_k")}
    assert kl["q8_0"] < 0.01 and kl["q8_0"] < kl["q4_k_m"] < kl["q2_k"], kl


def test_f16_preset_rewrites_an_f16_source_without_changing_weights(f16_file, quantised):
    src = {t.name: t for t in gguf.GGUFReader(f16_file).tensors}
    out = {t.name: t for t in gguf.GGUFReader(quantised["f16"][0]).tensors}  # llama.cpp reorders them
    assert sorted(src) == sorted(out)
    for name, t in src.items():
        assert t.tensor_type == out[name].tensor_type and np.array_equal(t.data, out[name].data), name


def test_fallbacks_are_reported_and_counted_in_bpw(odd_f16):
    result = quantize(odd_f16, odd_f16.parent / "odd-q4_k_m.gguf", "q4_k_m")
    info = inspect_gguf(result["path"])
    weights = [t["name"] for t in info["tensors"] if len(t["shape"]) == 2]
    fb = result["fallbacks"]
    assert sorted(fb["tensors"]) == sorted(weights)  # no row of 192 or 384 fits a 256-wide block
    assert sum(fb["by_type"].values()) == fb["count"] == len(weights)
    assert set(fb["by_type"]) <= {"Q5_0", "Q8_0"} and "Q4_K" not in info["tensor_types"], fb
    assert result["bpw"] == pytest.approx(bpw_from_types(info)) and result["bpw"] > 5.5
    assert np.isfinite(llama_logits(result["path"], text=TEXT)).all()
    q8 = quantize(odd_f16, odd_f16.parent / "odd-q8_0.gguf", "q8_0")  # 192 is a multiple of 32
    assert q8["fallbacks"]["count"] == 0 and set(q8["tensor_types"]) == {"Q8_0", "F32"}


def test_q2_k_takes_its_own_fallback_where_rows_do_not_fit(odd_f16, tmp_path):
    """The q2_k preset's `fallback` table: where rows do not take Q2_K / Q3_K, IQ4_NL (read from a
    dry run of llama.cpp's quantiser, which leaves no file) instead of llama.cpp's Q4_0: the same
    size, less error on those weights; types llama.cpp's mix wants otherwise (the tied embedding's
    Q6_K -> Q8_0) are left as llama.cpp falls back; every such weight is still reported."""
    from gguf.quants import dequantize

    preset = quant_presets.load("q2_k")
    assert preset["fallback"] == {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL"}
    ours = quantize(odd_f16, tmp_path / "ours.gguf", "q2_k")
    theirs = quantize(odd_f16, tmp_path / "theirs.gguf", {**preset, "fallback": {}, "name": "llama.cpp's"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.gguf", "theirs.gguf"]
    assert theirs["fallbacks"]["by_type"] == {"Q4_0": theirs["fallbacks"]["count"] - 1, "Q8_0": 1}
    assert ours["fallbacks"]["by_type"] == {"IQ4_NL": ours["fallbacks"]["count"] - 1, "Q8_0": 1}
    assert ours["fallbacks"]["tensors"] == theirs["fallbacks"]["tensors"]
    assert ours["size_bytes"] == theirs["size_bytes"]
    f16 = {t.name: t for t in gguf.GGUFReader(odd_f16).tensors}

    def error(path):
        return sum(float(np.square(dequantize(t.data, t.tensor_type) - f16[t.name].data.astype(np.float32)).sum())
                   for t in gguf.GGUFReader(path).tensors if t.tensor_type.name in ("Q4_0", "IQ4_NL"))

    assert error(tmp_path / "ours.gguf") < 0.9 * error(tmp_path / "theirs.gguf")
    assert np.isfinite(llama_logits(ours["path"], text=TEXT)).all()


@pytest.mark.parametrize("ftype, main", [("MOSTLY_Q4_K_M", "Q4_K"), ("MOSTLY_Q5_K_S", "Q5_K"), ("MOSTLY_Q8_0", "Q8_0"),
                                         ("MOSTLY_BF16", "BF16"), ("ALL_F32", "F32")])
def test_main_type_of_a_file_type(ftype, main):
    assert main_type(ftype) == main


def test_unknown_file_type_is_refused():
    with pytest.raises(EdgeloraError, match="no file type MOSTLY_Q9"):
        main_type("MOSTLY_Q9")


# ---------------------------------------------------------------- overrides

def test_tensor_overrides_match_whole_names(f16_file, tmp_path):
    preset = {"name": "custom", "llama_ftype": "MOSTLY_Q4_K_M",
              "overrides": {"output.weight": "q8_0", r"blk\.\d+\.attn_v\.weight": "Q4_K", "token_embd.weight": "f16"}}
    result = quantize(f16_file, tmp_path / "custom.gguf", preset)
    types = {t["name"]: t["type"] for t in inspect_gguf(tmp_path / "custom.gguf")["tensors"]}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == "Q4_K"
    assert types["blk.0.attn_output.weight"] == "Q4_K"  # "output.weight" does not catch attn_output
    assert result["fallbacks"]["count"] == 0 and result["preset"] == "custom"


@pytest.mark.parametrize("ftype, overrides, message", [
    ("MOSTLY_Q4_K_M", {"output.weight": "q9_9"}, "unknown tensor type 'Q9_9'"),
    ("MOSTLY_Q4_K_M", {"attn_v": "q8_0"}, "matches no weight tensor"),
    ("MOSTLY_Q4_K_M", {"blk.(": "q8_0"}, "bad pattern"),
    ("MOSTLY_F16", {"output.weight": "q8_0"}, "need a quantised preset"),
])
def test_bad_overrides_are_refused(f16_file, tmp_path, ftype, overrides, message):
    with pytest.raises(EdgeloraError, match=message):
        quantize(f16_file, tmp_path / "x.gguf", {"name": "bad", "llama_ftype": ftype, "overrides": overrides})
    assert folder_names(tmp_path) == []


# ---------------------------------------------------------------- errors and atomic output

def test_unknown_preset_lists_the_known_ones(f16_file, tmp_path):
    with pytest.raises(EdgeloraError) as e:
        quantize(f16_file, tmp_path / "x.gguf", "q5_z")
    assert "q5_z" in str(e.value) and all(name in str(e.value) for name in quant_presets.names())


@pytest.mark.parametrize("make", ["text", "truncated", "empty"])
def test_bad_source_names_the_file_and_writes_nothing(f16_file, tmp_path, make):
    src = tmp_path / "src" / "model.gguf"
    src.parent.mkdir()
    data = f16_file.read_bytes()
    src.write_bytes({"text": b"not a model\n", "truncated": data[: len(data) // 2], "empty": b""}[make])
    dst = tmp_path / "out" / "model-q4.gguf"
    with pytest.raises(EdgeloraError, match=re.escape(str(src))) as e:
        quantize(src, dst, "q4_k_m")
    assert "\n" not in str(e.value)
    assert not dst.parent.exists() or folder_names(dst.parent) == []


def test_llama_cpp_failure_names_both_files_and_leaves_nothing(tmp_path):
    src = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(src, "nonesuch")
    writer.add_tensor("blk.0.ffn_up.weight", np.ones((8, 256), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dst = tmp_path / "alien-q8_0.gguf"
    reason = rf"{re.escape(str(dst))}: llama.cpp could not quantise alien.gguf to q8_0: unknown model architecture"
    with pytest.raises(EdgeloraError, match=reason):
        quantize(src, dst, "q8_0")
    assert folder_names(tmp_path) == ["alien.gguf"]


def test_existing_destination_is_replaced_only_by_a_finished_file(f16_file, tmp_path):
    dst = tmp_path / "model.gguf"
    dst.write_bytes(b"old")
    with pytest.raises(EdgeloraError):
        quantize(tmp_path / "missing.gguf", dst, "q8_0")
    assert dst.read_bytes() == b"old"
    quantize(f16_file, dst, "q8_0")
    assert inspect_gguf(dst)["file_type"] == "MOSTLY_Q8_0" and folder_names(tmp_path) == ["model.gguf"]


def test_quantised_or_adapter_sources_are_refused(quantised, tmp_path):
    with pytest.raises(EdgeloraError, match="already quantised"):
        quantize(quantised["q8_0"][0], tmp_path / "x.gguf", "q4_k_m")


# ---------------------------------------------------------------- inspect

@pytest.mark.parametrize("tie", [False, True])
def test_inspect_counts_the_hf_parameters(tmp_path, tiny_tokenizer, tie):
    from transformers import AutoModelForCausalLM

    hf = build_model(tmp_path / "hf", tokenizer=tiny_tokenizer, tie=tie)
    convert(hf, tmp_path / "m.gguf")
    info = inspect_gguf(tmp_path / "m.gguf")
    model = AutoModelForCausalLM.from_pretrained(hf)
    # parameters() yields a tied embedding once; the GGUF stores it once (no output.weight).
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    assert ("output.weight" in [t["name"] for t in info["tensors"]]) is not tie
    assert (info["type"], info["arch"], info["file_type"]) == ("model", "llama", "MOSTLY_F16")
    assert (info["embedding_length"], info["block_count"], info["vocab_size"]) == (256, 2, len(tiny_tokenizer))
    assert info["tensor_bytes"] < info["size_bytes"] and 16.0 <= info["bpw"] < 16.1


def test_inspect_reads_a_lora_adapter(tmp_path, tiny_llama):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    convert_lora(tiny_llama, tmp_path / "adapter", tmp_path / "lora.gguf")
    info = inspect_gguf(tmp_path / "lora.gguf")
    assert (info["type"], info["arch"], info["lora_alpha"]) == ("adapter", "llama", 12.0)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert info["n_params"] == trainable and len(info["tensors"]) == 2 * 3 * 2
    assert "lora alpha" in format_inspect(info) and "adapter llama" in format_inspect(info)
    with pytest.raises(EdgeloraError, match="LoRA adapter"):
        quantize(tmp_path / "lora.gguf", tmp_path / "lora-q8.gguf", "q8_0")


def test_inspect_report_and_json(quantised):
    info = inspect_gguf(quantised["q4_k_m"][0])
    json.dumps(info)  # plain types only, for `edgelora inspect --json`
    text = format_inspect(info)
    assert "MOSTLY_Q4_K_M" in text and "bits per weight" in text and "Q4_K x" in text
    assert "blk.0.attn_q.weight" not in text
    assert "blk.0.attn_q.weight" in format_inspect(info, tensors=True)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"hello world, this is not a model"])
def test_inspect_rejects_non_gguf_in_one_line(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(EdgeloraError, match=re.escape(str(path))) as e:
        inspect_gguf(path)
    assert "\n" not in str(e.value)
    with pytest.raises(EdgeloraError, match="no such file"):
        inspect_gguf(tmp_path / "missing.gguf")


# ---------------------------------------------------------------- the real SmolLM2-135M

@pytest.mark.slow
@needs_smollm2
def test_smollm2_presets_sizes_and_bits(tmp_path):
    """Prints size, bits per weight, seconds, tensor types and fallbacks per preset (pytest -s)."""
    from edgelora.bases import materialise, resolve_base

    f16 = tmp_path / "smollm2-f16-src.gguf"
    convert(materialise(resolve_base("smollm2-135m")), f16)
    results = {p: quantize(f16, tmp_path / f"smollm2-{p}.gguf", p) for p in PRESETS}
    for p, r in results.items():
        print(f"{p:7} {r['size_bytes'] / 2**20:7.1f} MiB {r['bpw']:6.2f} bpw {r['seconds']:5.1f} s "
              f"types {r['tensor_types']} fallbacks {r['fallbacks']['by_type']}")
    sizes = [results[p]["size_bytes"] for p in PRESETS]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes
    for p, r in results.items():
        lo, hi = quant_presets.load(p)["expected_bpw"]
        assert lo <= r["bpw"] <= hi, (p, r["bpw"])


def test_the_bench_says_when_a_quant_name_is_nominal(odd_f16, tmp_path):
    from edgelora.bench import honest_notes
    from edgelora.gguf_info import inspect_gguf

    q2 = quantize(odd_f16, tmp_path / "odd-q2_k.gguf", "q2_k")
    (note,) = honest_notes(inspect_gguf(tmp_path / "odd-q2_k.gguf"))
    n = sum(sum(types.values()) for types in q2["class_types"].values())
    assert note.startswith(f"nominal: {q2['fallbacks']['count']} of {n} weights could not take Q2_K "
                           "(rows not a multiple of 256) and fell back (")
    assert f"real {q2['bpw']:.2f} bits/weight" in note and q2["fallbacks"]["count"] > 0
    assert honest_notes(inspect_gguf(tmp_path / "odd-q2_k.gguf"), imatrix=False)[1] == "no importance matrix"
    q8 = quantize(odd_f16, tmp_path / "odd-q8_0.gguf", "q8_0")  # 192 is a multiple of 32: no fallback
    assert q8["fallbacks"]["count"] == 0 and honest_notes(inspect_gguf(tmp_path / "odd-q8_0.gguf")) == []


def test_export_prints_when_a_quant_name_is_nominal(odd_f16):
    from tiny import run_cli

    r = run_cli("export", "--base", odd_f16.parent / "hf", "--quant", "q4_k_m", "--out", odd_f16.parent / "ex")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.strip().startswith("nominal:"))
    assert "weights fell back (" in line and "real " in line and "bits/weight" in line
