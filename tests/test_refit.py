"""The adapter refitted against the exact quantised base it ships with (edgelora.refit): the base
it trains against is llama.cpp's dequantisation of the file bit for bit, llama.cpp runs the base
GGUF + refitted LoRA GGUF as torch runs the refit model, the refit lowers the loss against that
base, it resumes after Ctrl-C, and what it cannot do is refused before any work."""
from __future__ import annotations

import json
import logging

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import assert_one_line_error, cfg, chat_rows, run_cli, write_jsonl

from edgelora import refit as R
from edgelora.errors import EdgeloraError
from edgelora.converters.hf_to_gguf import HFModel
from edgelora.quantize import quantize


@pytest.fixture(scope="module")
def base_q2_k(tiny_export, tmp_path_factory):
    """The tiny run's bare base (tiny_export's base:f16) quantised to q2_k by llama.cpp."""
    out = tmp_path_factory.mktemp("refit") / "base-q2_k.gguf"
    quantize(tiny_export["base:f16"], out, "q2_k")
    return out


def folder_weights(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / shard))
    assert set(out) == set(index["weight_map"])
    return out


def test_the_refit_base_is_llama_cpps_dequantisation_bit_for_bit(tiny_llama, run_dir, base_q2_k, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "SHARD_BYTES", 1 << 20)  # several shards, as a large model writes
    folder = R.dequantised_folder(base_q2_k, tiny_llama, run_dir / "adapter", tmp_path / "base")
    weights = folder_weights(folder)
    assert len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    hf = HFModel(tiny_llama)
    held = {t.name: t for t in gguf.GGUFReader(base_q2_k).tensors}
    quantised = 0
    for name, w in weights.items():
        original = hf.index.load(name).float()
        assert w.dtype == torch.float32 and w.shape == original.shape, name
        if w.dim() == 1:  # norms: float32 in the GGUF, taken from the HF model
            assert torch.equal(w, original), name
            continue
        t = held[hf.gguf_names[name]]
        # gguf-py's own dequantiser (numpy, not ggml's C) reads the same values out of the file
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape).copy())
        assert torch.equal(hf.to_gguf_layout(name, w), expected), name  # in llama.cpp's row order, bit for bit
        quantised += t.tensor_type == gguf.GGMLQuantizationType.Q2_K
        # ...and back in HF's order: near the original, which a wrong un-permutation would not be
        assert (w - original).pow(2).mean() < 0.25 * original.pow(2).mean(), name
    assert quantised >= 4
    from transformers import AutoModelForCausalLM  # loads as the trainer loads it

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weights["model.layers.0.self_attn.q_proj.weight"])


def loss_on(folder, adapter, examples):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), adapter).eval()
    total = 0.0
    with torch.no_grad():
        for row in examples:
            ids = tok.apply_chat_template(row["messages"], tokenize=True, return_tensors="pt", return_dict=True)
            total += model(**ids, labels=ids["input_ids"]).loss.item()
    return total / len(examples)


def test_a_refit_lowers_the_loss_against_the_quantised_base_and_resumes_after_ctrl_c(run_dir, tiny_llama, base_q2_k,
                                                                                     tmp_path, caplog):
    run = R.check(run_dir, steps=6)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C at step 3: a checkpoint, then the export's exit 130
        R.refit(run, base_q2_k, tiny_llama, work, on_step=lambda step, loss: step == 3)
    assert max(p.name for p in (work / "run" / "checkpoints").iterdir()) == "step-0000003"
    assert not (work / "run" / "adapter").exists()
    with caplog.at_level(logging.INFO, logger="edgelora"):
        info = R.refit(run, base_q2_k, tiny_llama, work)
    assert "6 steps (resuming)" in caplog.text and info["steps"] == 6
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    examples = chat_rows()[:8]
    before, after = loss_on(work / "base", run.adapter_dir, examples), loss_on(work / "base", work / "run" / "adapter",
                                                                               examples)
    assert after < before, (before, after)
    assert info["loss_last"] < info["loss_first"]


def test_llama_cpp_runs_the_shipped_pair_as_torch_runs_the_refit_model(run_dir, tmp_path):
    from edgelora.exporter import export
    from edgelora.handoff import REFIT, Role

    out = tmp_path / "out"
    result = export(str(run_dir), quants=["q8_0"], refit=["q2_k"], refit_steps=4, out=str(out))
    files = {str(f.role): f for f in result.files}
    assert set(files) == {"merged:q8_0", "base:q2_k", "refit:q2_k"}  # the merged refit only when asked
    refit = files["refit:q2_k"].refit
    assert refit["steps"] == 4 and refit["verified"]["passed"], refit
    kl = float(refit["verified"]["figure"].split()[1].rstrip(","))
    assert kl <= 1e-3, refit  # the bound; the check itself allows what f16 rounding is allowed
    assert [c for c in result.checks if c["name"] == "refit"][0]["file"] == "tiny-run-refit-q2_k-lora-f16.gguf"
    stops = [c for c in result.checks if c["file"] == "tiny-run-refit-q2_k-lora-f16.gguf" and c["name"] == "stops"]
    assert stops and stops[0]["passed"]
    assert not list(out.glob(".*work"))  # the dequantised base and the refit's run are gone
    base = out / files["base:q2_k"].file
    assert result.refit_routes[Role(REFIT, "q2_k")] == (f"llama-server -m {base} "
                                                         f"--lora {out}/tiny-run-refit-q2_k-lora-f16.gguf")
    lora = gguf.GGUFReader(out / "tiny-run-refit-q2_k-lora-f16.gguf")
    assert lora.fields["general.type"].contents() == "adapter"
    from edgelora.bench.candidates import discover

    labels = {c.label: c for c in discover([str(out)], hf=False)}
    assert labels["q2_k+refit"].loras == [str(out / "tiny-run-refit-q2_k-lora-f16.gguf")]
    assert labels["q2_k+refit"].model == str(base)
    assert "q2_k+lora" not in labels  # no --lora-gguf: no plain LoRA to pair the base with
    np.testing.assert_equal(labels["q2_k+refit"].size_bytes, sum(
        p.stat().st_size for p in (base, out / "tiny-run-refit-q2_k-lora-f16.gguf")))


@pytest.mark.parametrize("args, message", [
    (["--refit", "q9_9"], "--refit q9_9: not a quantised preset (choose from q2_k, q4_k_m, q8_0, auto)"),
    (["--refit", "f16"], "--refit f16: not a quantised preset"),
    (["--refit", "q2_k", "--refit-steps", "0"], "--refit-steps"),
    (["--refit-steps", "3"], "--refit-steps and --refit-merged go with --refit QUANT"),
    (["--refit-merged"], "--refit-steps and --refit-merged go with --refit QUANT"),
])
def test_a_refit_it_cannot_do_is_refused_before_any_file(run_dir, tmp_path, args, message):
    out = tmp_path / "out"
    r = run_cli("export", run_dir, "--quant", "q8_0", *args, "--out", out)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert not out.exists() or not any(out.iterdir())


def test_a_refit_needs_a_run_a_lora_and_its_data(run_dir, tiny_llama, tmp_path):
    from edgelora.trainer import train

    assert_one_line_error(run_cli("export", "--base", tiny_llama, "--refit", "q2_k", "--out", tmp_path / "a"),
                          "--refit needs a RUN_DIR")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    dora = tmp_path / "dora"
    train(cfg(tiny_llama, data, dora, max_steps=1, dora=True, eval_split=0.0))
    assert_one_line_error(run_cli("export", dora, "--refit", "q2_k", "--out", tmp_path / "b"),
                          f"--refit: {dora} trained a DoRA adapter, which llama.cpp cannot run as a LoRA")
    lora = tmp_path / "lora"
    train(cfg(tiny_llama, data, lora, max_steps=1, eval_split=0.0))
    data.unlink()
    assert_one_line_error(run_cli("export", lora, "--refit", "q2_k", "--out", tmp_path / "c"),
                          f"--refit: the run's training data {data} is not found")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_refit_against_auto_trains_against_the_budgeted_files_types(run_dir, tmp_path):
    from edgelora.exporter import export

    out = tmp_path / "out"
    result = export(str(run_dir), quants=["q8_0"], target_bpw=5.0, refit=["auto"], refit_steps=2, out=str(out),
                    verify=False)
    files = {str(f.role): f for f in result.files}
    assert set(files) == {"merged:q8_0", "merged:auto", "base:auto", "refit:auto"}
    types = {name: {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / files[name].file).tensors}
             for name in ("merged:auto", "base:auto")}
    assert types["merged:auto"] == types["base:auto"] and len(set(types["base:auto"].values())) > 1
    assert files["refit:auto"].refit["steps"] == 2


def test_a_refit_takes_a_third_of_the_runs_steps_by_default(run_dir):
    """The documented default (cli's --refit-steps help, docs/export.md): a third, at least 4."""
    import math

    from edgelora.handoff import RunSummary

    trained = RunSummary.read(run_dir).steps
    assert R.check(run_dir, None).steps == max(4, math.ceil(trained / 3)) and R.check(run_dir, 7).steps == 7


def test_refit_auto_needs_a_budget(run_dir, tmp_path):
    assert_one_line_error(run_cli("export", run_dir, "--refit", "auto", "--out", tmp_path / "out"),
                          "--refit auto needs a budget: --target-size SIZE or --target-bpw BITS")


def test_the_refit_merged_and_quantised_again_keeps_the_bases_types(run_dir, tmp_path):
    from edgelora.exporter import export

    out = tmp_path / "out"
    result = export(str(run_dir), quants=["q8_0"], refit=["q2_k"], refit_steps=2, refit_merged=True, out=str(out))
    files = {str(f.role): f for f in result.files}
    merged = files["refit-merged:q2_k"]
    assert merged.file == "tiny-run-refit-q2_k.gguf"
    types = {name: {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / files[name].file).tensors}
             for name in ("base:q2_k", "refit-merged:q2_k")}
    assert types["base:q2_k"] == types["refit-merged:q2_k"]
    figures = files["refit:q2_k"].refit["merged"]
    assert 0 <= figures["kl_vs_refit"] and 0 <= figures["top1_vs_refit"] <= 1
    assert ("tiny-run-refit-q2_k.gguf", "stops") in {(c["file"], c["name"]) for c in result.checks}
    from edgelora.bench.candidates import discover

    labels = {c.label: c for c in discover([str(out)], hf=False)}
    assert labels["q2_k+refit-merged"].route == "merged" and labels["q2_k+refit-merged"].model == str(out / merged.file)


def test_doctor_checks_a_shipped_refit_pair_from_the_files_alone(run_dir, chat_file, tmp_path):
    """doctor BASE --lora REFIT --data --base RUN: the refit model rebuilt from the two files (the
    LoRA's A and B read back from the GGUF), matched by llama.cpp; the LoRA names its one base."""
    from test_doctor import doctor

    from edgelora.exporter import export

    out = tmp_path / "out"
    result = export(str(run_dir), quants=["q8_0"], refit=["q2_k"], refit_steps=2, out=str(out), verify=False)
    files = {str(f.role): out / f.file for f in result.files}
    r, checks = doctor(files["base:q2_k"], "--lora", files["refit:q2_k"], "--data", chat_file, "--base", run_dir)
    assert checks["refit"][0] and checks["lora_base"][0], r.output
    kl = float(checks["refit"][1].split()[1].rstrip(","))
    assert kl <= 1e-3, checks["refit"]
    r, checks = doctor(files["merged:q8_0"], "--lora", files["refit:q2_k"])  # another base: refused by its sha256
    assert not checks["lora_base"][0] and "the LoRA was made for the base with sha256" in checks["lora_base"][1]


def test_export_prints_the_line_that_runs_a_refit(run_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli("export", run_dir, "--quant", "q8_0", "--refit", "q2_k", "--refit-steps", 2, "--no-verify", "--out", out)
    assert r.exit_code == 0, r.output
    base = next(out.glob("*-base-q2_k.gguf"))
    assert f"refitted against q2_k (llama.cpp): llama-server -m {base} --lora {out}/tiny-run-refit-q2_k-lora-f16.gguf" \
        in r.output


def test_the_packed_base_trains_as_the_dequantised_one_from_the_files_own_bytes(run_dir, tiny_llama, base_q2_k,
                                                                                tmp_path):
    """The refit's base held as the GGUF's blocks (edgelora.packed): the same loss and the same
    adapter gradients as the float32 dequantised base, each decoder weight kept as the file's bytes."""
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgelora.layerwise import checkpoint_name
    from edgelora.packed import PackedLinear, pack_linears

    folder = R.dequantised_folder(base_q2_k, tiny_llama, run_dir / "adapter", tmp_path / "base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                      run_dir / "adapter", is_trainable=True)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    packed = copy.deepcopy(model)
    types = pack_linears(packed, base_q2_k, tiny_llama)
    held = {t.name: t for t in gguf.GGUFReader(base_q2_k).tensors}
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert sum(types.values()) == len(layers) == 7 * packed.base_model.model.config.num_hidden_layers
    assert "Q2_K" in types and all(m.weight.numel() == 0 for m in layers.values())
    hf, weights = HFModel(tiny_llama), folder_weights(folder)
    for name, layer in layers.items():
        hf_name = checkpoint_name(f"{name}.weight")
        assert layer.rows.nbytes == held[hf.gguf_names[hf_name]].n_bytes  # the file's bytes, not 4 a weight
        assert torch.equal(layer.dequantised(), weights[hf_name]), name  # HF's row order, bit for bit

    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    ids = tok.apply_chat_template(chat_rows()[0]["messages"], tokenize=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    results = []
    for m in (model, packed):
        m.train()
        torch.manual_seed(0)  # the same LoRA dropout masks
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (loss, grads), (packed_loss, packed_grads) = results
    assert torch.equal(loss, packed_loss)
    assert grads.keys() == packed_grads.keys() and len(grads) >= 14
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    attn = model.base_model.model.model.layers[1].self_attn  # a model the file is not of: refused, named
    attn.o_proj = torch.nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features + 1, bias=False)
    with pytest.raises(EdgeloraError, match=r"blk\.1\.attn_output\.weight is \[\d+, \d+\], the model's "
                                            r"model\.layers\.1\.self_attn\.o_proj\.weight"):
        pack_linears(model, base_q2_k, tiny_llama)
