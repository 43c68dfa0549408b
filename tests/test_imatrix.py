"""Importance matrices (edgelora.imatrix): llama.cpp's file format both ways, values equal to a direct
computation on a tiny model, llama.cpp's quantiser really using them, and one-line errors for
malformed or mismatched ones."""
import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgelora import imatrix as IM
from edgelora.errors import EdgeloraError
from edgelora.quantize import TensorSwap, quantize
from tiny import assert_one_line_error, kept_of, run_cli

SEQUENCES = [[1, 5, 9, 13, 2, 7], [3, 4, 4, 8], [6, 1, 2, 3, 4, 5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def computed(tiny_llama):
    return IM.compute(tiny_llama, None, SEQUENCES, datasets=["unit"], chunk_size=10, batch_size=2)


@pytest.fixture(scope="module")
def f16(tiny_llama, tmp_path_factory) -> Path:
    from edgelora.converters.hf_to_gguf import convert

    out = tmp_path_factory.mktemp("imatrix") / "tiny-f16.gguf"
    convert(tiny_llama, out)
    return out


def direct_sums(model_dir, weight_of=lambda seq, logits: torch.ones(len(seq), dtype=torch.float64)):
    """Layer 0's q/k/v input (the input norm of the embeddings) and layer 1's (the input norm of
    layer 0's output): each real token's squares times its weight, summed over SEQUENCES."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expect0, expect1 = 0, 0
    with torch.no_grad():
        for seq in SEQUENCES:
            out = model(torch.tensor([seq]), output_hidden_states=True)
            w = weight_of(seq, out.logits[0])[:, None]
            x0 = model.model.layers[0].input_layernorm(out.hidden_states[0])[0].double()
            x1 = model.model.layers[1].input_layernorm(out.hidden_states[1])[0].double()
            expect0, expect1 = expect0 + (w * x0 * x0).sum(0), expect1 + (w * x1 * x1).sum(0)
    return expect0.numpy(), expect1.numpy()


def test_values_equal_a_direct_computation(tiny_llama, computed):
    """Sums of squares over every real token (padding excluded), counts = the tokens."""
    expect0, expect1 = direct_sums(tiny_llama)
    tokens = sum(map(len, SEQUENCES))
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        np.testing.assert_allclose(computed.sums[name][0], expect0, rtol=1e-4)
    np.testing.assert_allclose(computed.sums["blk.1.attn_q.weight"][0], expect1, rtol=1e-4)
    assert all(c.tolist() == [tokens] for c in computed.counts.values())
    assert computed.decision_weight == 0
    names = set(computed.sums)
    assert names == {f"blk.{i}.{w}.weight" for i in range(2) for w in
                     ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert computed.sums["blk.0.ffn_down.weight"].shape == (1, 512)  # the intermediate size: ffn_down's rows


def test_decision_weighting_equals_a_direct_computation(tiny_llama, computed, tmp_path):
    """With labels, a token whose next token is an answer's counts 1 + a * the model's entropy over
    that next token; every other token once. Counts stay token counts; the weight is in the file."""
    labels = [[-100, -100, -100, 13, 2, 7], [-100] * 4, [-100] * 7 + [7, 8, 9]]  # the second: no answer at all
    a = 10.0

    def weight_of(seq, logits):
        i = SEQUENCES.index(seq)
        logp = torch.log_softmax(logits.double(), -1)
        entropy = -(logp.exp() * logp).sum(-1)
        deciding = torch.tensor([labels[i][t + 1] != -100 for t in range(len(seq) - 1)] + [False])
        return 1 + a * entropy * deciding

    weighted = IM.compute(tiny_llama, None, SEQUENCES, datasets=["unit"], chunk_size=10, batch_size=2,
                          labels=labels, decision_weight=a)
    expect0, expect1 = direct_sums(tiny_llama, weight_of)
    np.testing.assert_allclose(weighted.sums["blk.0.attn_v.weight"][0], expect0, rtol=1e-4)
    np.testing.assert_allclose(weighted.sums["blk.1.attn_q.weight"][0], expect1, rtol=1e-4)
    assert not np.allclose(weighted.sums["blk.1.attn_q.weight"], computed.sums["blk.1.attn_q.weight"], rtol=1e-2)
    assert all(weighted.counts[n].tolist() == computed.counts[n].tolist() for n in computed.counts)
    again = IM.read(IM.write(weighted, tmp_path / "w.imatrix.gguf", "llama"))
    assert again.decision_weight == a and IM.read(IM.write(computed, tmp_path / "p.gguf", "llama")).decision_weight == 0
    unweighted = IM.compute(tiny_llama, None, SEQUENCES, datasets=["unit"], chunk_size=10, batch_size=2,
                            labels=labels, decision_weight=0)
    np.testing.assert_allclose(unweighted.sums["blk.1.attn_q.weight"], computed.sums["blk.1.attn_q.weight"], rtol=1e-6)


SHARING = [[1, 5, 9, 13, 2, 7], [1, 5, 9, 13, 4, 8], [1, 5, 9, 6, 1, 2, 3, 4, 5, 6]]  # all begin with 1, 5, 9


@pytest.mark.parametrize("weight", [0.0, 10.0])
@pytest.mark.parametrize("sequences, labels", [
    (SEQUENCES, [[-100, -100, -100, 13, 2, 7], [-100] * 4, [-100] * 7 + [7, 8, 9]]),
    (SHARING, [[-100] * 4 + [2, 7], [-100] * 5 + [8], [-100] * 7 + [4, 5, 6]]),  # read once, counted 3 times
])
def test_llama_cpp_computes_what_torch_computes(tiny_llama, f16, weight, sequences, labels):
    """compute_gguf (llama.cpp's forward over the f16 GGUF, its eval callback) against compute (torch,
    float32): the same weights, the same token counts, the same sums up to the f16 rounding of the
    weights (about 1% on the worst column here), decision weighting included; sequences that begin
    alike have that beginning read once by llama.cpp, every sequence's tokens counted."""
    in_torch = IM.compute(tiny_llama, None, sequences, datasets=["unit"], chunk_size=10, batch_size=2,
                          labels=labels, decision_weight=weight)
    in_llama = IM.compute_gguf(f16, sequences, datasets=["unit"], chunk_size=10, labels=labels,
                               decision_weight=weight, device="cpu")
    assert sorted(in_llama.sums) == sorted(in_torch.sums)
    for name in in_torch.sums:
        assert in_llama.counts[name].tolist() == in_torch.counts[name].tolist() == [sum(map(len, sequences))]
        np.testing.assert_allclose(in_llama.sums[name], in_torch.sums[name], rtol=0.03, atol=1e-3)
    assert in_llama.decision_weight == in_torch.decision_weight == weight
    assert (in_llama.chunk_count, in_llama.chunk_size) == (3, 10)


def test_llama_cpp_reads_a_sequence_longer_than_a_batch_in_parts(tiny_llama, f16):
    """A 600-token sequence (llama.cpp's batch is 512): read in two parts, each part's answer rows weighted
    by their own entropies, the same sums as torch's one pass."""
    rng = np.random.default_rng(0)
    long = rng.integers(3, 500, size=600).tolist()
    labels = [[-100] * 300 + long[300:]]
    in_torch = IM.compute(tiny_llama, None, [long], datasets=["unit"], chunk_size=600, labels=labels,
                          decision_weight=5.0)
    in_llama = IM.compute_gguf(f16, [long], datasets=["unit"], chunk_size=600, labels=labels,
                               decision_weight=5.0, device="cpu")
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        np.testing.assert_allclose(in_llama.sums[name], in_torch.sums[name], rtol=0.03)
        assert in_llama.counts[name].tolist() == [600]


def test_llama_cpp_decision_weighting_moves_the_sums(f16):
    """The weighted sums differ from the plain ones (the answers' entropies are not zero), the counts do not."""
    labels = [[-100, -100, -100, 13, 2, 7], [-100] * 4, [-100] * 7 + [7, 8, 9]]
    plain = IM.compute_gguf(f16, SEQUENCES, datasets=["unit"], chunk_size=10, device="cpu")
    weighted = IM.compute_gguf(f16, SEQUENCES, datasets=["unit"], chunk_size=10, labels=labels,
                               decision_weight=10.0, device="cpu")
    name = "blk.1.ffn_down.weight"
    assert (weighted.sums[name] > plain.sums[name] * 1.01).any()
    assert (weighted.sums[name] >= plain.sums[name] * (1 - 1e-6)).all()  # every token weighs at least 1
    assert weighted.counts[name].tolist() == plain.counts[name].tolist()


def test_gguf_file_round_trips_in_llama_cpps_format(computed, tmp_path):
    path = IM.write(computed, tmp_path / "m.imatrix.gguf", "llama")
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "imatrix"
    assert (fields["imatrix.datasets"], fields["imatrix.chunk_count"], fields["imatrix.chunk_size"]) == (["unit"], 3, 10)
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.0.attn_q.weight.in_sum2"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F32 and list(q.shape) == [256, 1]  # ne0 = columns, ne1 = n_mat
    assert list(tensors["blk.0.attn_q.weight.counts"].shape) == [1, 1]
    assert len(tensors) == 2 * len(computed.sums)
    again = IM.read(path)
    assert again.datasets == ["unit"] and again.origin == str(path)
    for name in computed.sums:
        np.testing.assert_array_equal(again.sums[name], computed.sums[name])
        np.testing.assert_array_equal(again.counts[name], computed.counts[name])
        np.testing.assert_allclose(again.importance(name), computed.sums[name][0] / computed.counts[name][0], rtol=1e-6)


def test_only_keeps_exactly_the_named_weights(computed):
    names = [n for n in computed.sums if ".attn_" in n]
    for given in (names, iter(names), (n for n in names)):  # any iterable, a generator too
        part = computed.only(given)
        assert sorted(part.sums) == sorted(part.counts) == sorted(names)
        assert all(part.sums[n] is computed.sums[n] for n in names)


def test_legacy_dat_is_read_as_llama_cpp_reads_it(tmp_path):
    """The legacy format stores (sum / count) * ncall; the quantiser gets that / ncall."""
    values = np.array([2.0, 4.0, 6.0, 8.0], dtype=np.float32)
    name = b"blk.0.attn_q.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 2, 4) + values.tobytes()
    data += struct.pack("<ii", 7, 4) + b"demo"
    path = tmp_path / "old.dat"
    path.write_bytes(data)
    m = IM.read(path)
    np.testing.assert_allclose(m.importance("blk.0.attn_q.weight"), values / 2)
    assert (m.chunk_count, m.datasets) == (7, ["demo"])


def weighted_error(f16: Path, quantised: Path, imatrix: IM.IMatrix) -> float:
    """sum over blk weights of sum_ij importance_j * (w_ij - w_hat_ij)^2: what the quantiser minimises."""
    original = {t.name: t for t in gguf.GGUFReader(f16).tensors}
    total = 0.0
    for t in gguf.GGUFReader(quantised).tensors:
        if t.name in imatrix.sums:
            w = np.asarray(original[t.name].data, dtype=np.float64)
            w_hat = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(w.shape)
            total += float((imatrix.importance(t.name) * (w - w_hat) ** 2).sum())
    return total


def test_llama_cpp_uses_it(f16, computed, tmp_path):
    plain = quantize(f16, tmp_path / "plain.gguf", "q4_k_m")
    guided = quantize(f16, tmp_path / "guided.gguf", "q4_k_m", imatrix=computed)
    assert plain["tensor_types"] == guided["tensor_types"]
    assert (tmp_path / "plain.gguf").read_bytes() != (tmp_path / "guided.gguf").read_bytes()
    assert weighted_error(f16, tmp_path / "guided.gguf", computed) < weighted_error(f16, tmp_path / "plain.gguf",
                                                                                    computed)


def test_the_types_that_take_no_matrix_are_the_same_without_it(f16, computed, tmp_path):
    """search.MATRIX_UNUSED: the q8_0 search makes its file once, on this claim."""
    from edgelora.search import MATRIX_UNUSED

    preset = {"name": "mix", "llama_ftype": "MOSTLY_Q8_0", "overrides": {r".*attn_q\.weight": "F16",
                                                                          r".*ffn_up\.weight": "F32"}}
    plain = quantize(f16, tmp_path / "plain.gguf", preset)
    guided = quantize(f16, tmp_path / "guided.gguf", preset, imatrix=computed)
    assert {"Q8_0", "F16", "F32"} <= set(guided["tensor_types"]) <= MATRIX_UNUSED
    assert plain["tensor_types"] == guided["tensor_types"]
    assert (tmp_path / "plain.gguf").read_bytes() == (tmp_path / "guided.gguf").read_bytes()


def test_swapping_tensors_equals_quantising_with_the_matrix_for_those_alone(f16, computed, tmp_path):
    plain = quantize(f16, tmp_path / "plain.gguf", "q4_k_m")["path"]
    guided = quantize(f16, tmp_path / "guided.gguf", "q4_k_m", imatrix=computed)["path"]
    names = [n for n in computed.sums if ".attn_q." in n or ".ffn_down." in n]
    quantize(f16, tmp_path / "only.gguf", "q4_k_m", imatrix=computed.only(names))
    TensorSwap(plain, guided).write(names, tmp_path / "swapped.gguf")
    swapped = (tmp_path / "swapped.gguf").read_bytes()
    assert swapped == (tmp_path / "only.gguf").read_bytes()
    assert swapped not in (Path(plain).read_bytes(), Path(guided).read_bytes())
    quantize(f16, tmp_path / "q8.gguf", "q8_0")
    with pytest.raises(EdgeloraError, match=r"^q8\.gguf: tensor [\w.]+ is laid out differently "
                                            r"from plain\.gguf \(Q8_0 at byte \d+ vs Q\d_K at byte \d+\)$"):
        TensorSwap(plain, tmp_path / "q8.gguf")
    with pytest.raises(EdgeloraError, match=r"^plain\.gguf: has no tensor blk\.7\.ffn_up\.weight$"):
        TensorSwap(plain, guided).write(["blk.7.ffn_up.weight"], tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize("mangle, message", [
    (lambda m: (m.sums.update({"blk.9.attn_q.weight": m.sums["blk.0.attn_q.weight"]}),
                m.counts.update({"blk.9.attn_q.weight": m.counts["blk.0.attn_q.weight"]})),
     "'blk.9.attn_q.weight' is not a weight of"),
    (lambda m: m.sums.update({"blk.0.attn_q.weight": m.sums["blk.0.attn_q.weight"][:, :100]}),
     "'blk.0.attn_q.weight' has 100 values, the tensor needs 256"),
    (lambda m: m.sums["blk.1.ffn_up.weight"].__setitem__((0, 3), np.nan), "'blk.1.ffn_up.weight' holds NaN"),
    (lambda m: m.sums["blk.1.ffn_up.weight"].__setitem__((0, 3), -1.0), "'blk.1.ffn_up.weight' holds negative"),
])
def test_a_bad_imatrix_is_one_line_naming_the_tensor_and_leaves_no_file(f16, computed, tmp_path, mangle, message):
    bad = IM.IMatrix({k: v.copy() for k, v in computed.sums.items()}, dict(computed.counts))
    mangle(bad)
    path = IM.write(bad, tmp_path / "bad.gguf", "llama")
    with pytest.raises(EdgeloraError, match=message) as e:
        quantize(f16, tmp_path / "out.gguf", "q4_k_m", imatrix=IM.read(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "out.gguf").exists()


def test_not_an_imatrix_file(f16, tmp_path):
    with pytest.raises(EdgeloraError, match="a GGUF, but not an importance matrix"):
        IM.read(f16)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(EdgeloraError, match="junk.dat: damaged or not an imatrix file"):
        IM.read(junk)


def test_a_changed_llama_cpp_struct_is_refused(computed, monkeypatch):
    import ctypes

    import llama_cpp

    class Other(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.POINTER(ctypes.c_float))]

    monkeypatch.setattr(llama_cpp, "llama_model_imatrix_data", Other)
    with pytest.raises(EdgeloraError, match="passes importance matrices differently"):
        IM.quantizer_array(computed)


def test_weights_are_grouped_by_class_and_a_third_of_the_layers():
    from edgelora.search import weight_groups

    names = [f"blk.{i}.{c}.weight" for i in range(30) for c in ("attn_q", "ffn_up")] + ["output.weight"]
    groups = weight_groups(names)
    assert list(groups) == ["attn_q blk.0-9", "ffn_up blk.0-9", "attn_q blk.10-19", "ffn_up blk.10-19",
                            "attn_q blk.20-29", "ffn_up blk.20-29", "output"]
    assert groups["ffn_up blk.10-19"] == [f"blk.{i}.ffn_up.weight" for i in range(10, 20)]
    assert sorted(n for g in groups.values() for n in g) == sorted(names)  # each weight in exactly one group
    assert list(weight_groups(["blk.0.attn_q.weight", "blk.1.attn_q.weight"])) == ["attn_q blk.0", "attn_q blk.1"]


def test_export_computes_it_from_the_runs_training_data(tiny_export, tmp_path):
    run = tiny_export["merged:f16"].parent.parent
    out = tmp_path / "ex"
    r = run_cli("export", run, "--quant", "q4_k_m", "--quant", "q8_0", "--out", out, "--imatrix-tokens", 300,
                "--imatrix-decision-weight", 0)  # not the default: every token alike
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["imatrix"]
    assert info["computed"] and info["file"] == "tiny-run-imatrix.gguf" and info["datasets"] == ["chat.jsonl"]
    assert 300 <= info["tokens"] < 300 + 64 and info["entries"] == 14  # whole sequences up to the budget
    written = IM.read(out / info["file"])
    assert written.counts["blk.0.attn_q.weight"].tolist() == [info["tokens"]]
    assert info["decision_weight"] == written.decision_weight == 0 != IM.DECISION_WEIGHT
    assert info["engine"] == "llama.cpp"
    seconds = manifest["seconds"]  # where the export's time went, stage by stage (edgelora.stages)
    assert {"convert", "imatrix", "probe", "quantise", "measure", "trials", "answers", "verify"} <= set(seconds)
    assert sum(v for k, v in seconds.items() if k != "total") <= seconds["total"]
    from edgelora.stages import summary
    assert f"time: {summary(seconds)}" in r.output
    q8, q4 = sorted(manifest["outputs"], key=lambda o: o["file"] != "tiny-run-q8_0.gguf")
    assert q8["file"] == "tiny-run-q8_0.gguf" and not q8["imatrix"]  # Q8_0 takes no matrix: not said to have one
    assert not q8["imatrix_check"]["imatrix_kept"] and q8["imatrix_check"]["imatrix_groups"] == []
    check = q4["imatrix_check"]  # made with, without, and with it for the groups it helps alone: lowest KL kept
    assert check["sequences"] == 24 and check["kl_with_imatrix"] > 0 and check["kl_without"] > 0
    by_group = check["kl_by_group"]  # two layers: a group is one class in one layer
    assert set(by_group) == {f"{c} blk.{i}" for c in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                       "ffn_up", "ffn_down") for i in (0, 1)}
    helped = sorted(g for g, kl in by_group.items() if kl < check["kl_without"])
    assert (check["kl_chosen"] is not None) == (0 < len(helped) < len(by_group))
    best = kept_of(check)  # the most held-out prompts answered as the f16 does, then the lowest KL
    expected = {"with_imatrix": sorted(by_group), "without": [], "chosen": helped}[best]
    assert sorted(check["imatrix_groups"]) == expected and q4["imatrix"] == check["imatrix_kept"] == bool(expected)
    r = run_cli("export", run, "--quant", "q4_k_m", "--out", tmp_path / "none", "--imatrix", "none")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "none" / "manifest.json").read_text())
    assert manifest["imatrix"] is None and not manifest["outputs"][0]["imatrix"]
    plain = (tmp_path / "none" / "tiny-run-q4_k_m.gguf").read_bytes()
    assert ((out / "tiny-run-q4_k_m.gguf").read_bytes() == plain) == (not q4["imatrix"])
    r = run_cli("export", run, "--quant", "q4_k_m", "--out", tmp_path / "given", "--imatrix", out / info["file"])
    assert r.exit_code == 0, r.output
    given = json.loads((tmp_path / "given" / "manifest.json").read_text())
    assert given["imatrix"]["file"] == str((out / info["file"]).resolve()) and not given["imatrix"]["computed"]
    assert given["outputs"][0]["imatrix"] and given["outputs"][0]["imatrix_check"] is None  # no data to check on
    guided = (tmp_path / "given" / "tiny-run-q4_k_m.gguf").read_bytes()
    kept = (out / "tiny-run-q4_k_m.gguf").read_bytes()
    assert guided != plain and (kept == guided) == (best == "with_imatrix")


def test_export_with_a_mismatched_imatrix_file_is_one_line(tiny_export, computed, tmp_path):
    run = tiny_export["merged:f16"].parent.parent
    bad = IM.IMatrix({"blk.0.attn_q.weight": np.ones((1, 7), np.float32)}, {"blk.0.attn_q.weight": np.ones(1)})
    path = IM.write(bad, tmp_path / "other-model.imatrix.gguf", "llama")
    r = run_cli("export", run, "--quant", "q4_k_m", "--out", tmp_path / "ex", "--imatrix", path)
    assert_one_line_error(r, "'blk.0.attn_q.weight' has 7 values, the tensor needs 256")
    assert not (tmp_path / "ex" / "tiny-run-q4_k_m.gguf").exists()


def test_plain_conversion_takes_calibration_data(tiny_llama, chat_file, tmp_path):
    r = run_cli("export", "--base", tiny_llama, "--quant", "q4_k_m", "--out", tmp_path / "ex",
                "--imatrix-data", chat_file)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ex" / "manifest.json").read_text())["imatrix"]["datasets"] == ["chat.jsonl"]


def test_the_adaptive_search_keeps_what_reading_every_sequence_keeps(tiny_export, run_dir, tmp_path):
    """Each group read only until its sign is settled (KLProbe.compare, --effort default) decides as
    reading every held-out sequence does (--effort thorough): the same groups helped, the same file
    kept, byte for byte; on fewer positions."""
    from edgelora import exporter as E

    plan = E.plan_export(str(run_dir), None, ["q4_k_m"], False, str(tmp_path / "plan"))
    calibration = E._calibration(plan, None, 0)
    f16 = tiny_export["merged:f16"]
    probe = E._probe(f16, calibration)
    importance = IM.compute_gguf(f16, [ids for ids, _ in calibration.sequences[:16]], datasets=["t"], chunk_size=64,
                                 device="cpu")
    adaptive = E.quantize_searched(f16, tmp_path / "adaptive.gguf", "q4_k_m", importance, probe,
                                   settle_z=E.EFFORTS["default"].settle_z)[1]
    exhaustive = E.quantize_searched(f16, tmp_path / "exhaustive.gguf", "q4_k_m", importance, probe,
                                     settle_z=E.EFFORTS["thorough"].settle_z)[1]
    total = exhaustive["positions"]
    assert set(exhaustive["positions_by_group"].values()) == {total}
    assert sorted(adaptive["imatrix_groups"]) == sorted(exhaustive["imatrix_groups"])
    assert (tmp_path / "adaptive.gguf").read_bytes() == (tmp_path / "exhaustive.gguf").read_bytes()
    assert all(0 < n <= total for n in adaptive["positions_by_group"].values())
    for group, kl in exhaustive["kl_by_group"].items():  # each estimate on the side of the exact figure's sign
        assert (adaptive["kl_by_group"][group] < adaptive["kl_without"]) == (kl < exhaustive["kl_without"])


def test_a_trial_read_from_its_first_layer_decides_as_the_whole_file(tiny_export, run_dir, tmp_path, monkeypatch):
    """A group's trial file is the one without the matrix up to the group's first layer, so the
    search reads only the layers from there, from the inputs the file without the matrix gave
    them (search.LAYER_INDEPENDENT): every figure and the kept file the same as whole files give."""
    from edgelora import exporter as E
    from edgelora import search as S
    from edgelora.gguf_header import gguf_layout, gguf_metadata
    from edgelora.klprobe import KLProbe
    from edgelora.llamacpp import LayerInputs

    plan = E.plan_export(str(run_dir), None, ["q4_k_m"], False, str(tmp_path / "plan"))
    calibration = E._calibration(plan, None, 0)
    f16 = tiny_export["merged:f16"]
    importance = IM.compute_gguf(f16, [ids for ids, _ in calibration.sequences[:16]], datasets=["t"], chunk_size=64,
                                 device="cpu")
    searched, firsts, write = {}, {}, TensorSwap.write
    for way, archs in (("from a layer", S.LAYER_INDEPENDENT), ("whole", frozenset())):
        monkeypatch.setattr(S, "LAYER_INDEPENDENT", archs)
        monkeypatch.setattr(TensorSwap, "write", lambda self, names, dst, from_layer=0, way=way: (
            firsts.setdefault(way, []).append(from_layer), write(self, names, dst, from_layer))[1])
        probe = E._probe(f16, calibration)
        searched[way] = E.quantize_searched(f16, tmp_path / f"{way}.gguf", "q4_k_m", importance, probe,
                                            settle_z=E.EFFORTS["default"].settle_z)[1]
    monkeypatch.setattr(TensorSwap, "write", write)
    assert sorted(set(firsts["from a layer"])) == [0, 1] and set(firsts["whole"]) == {0}  # groups in blk.1: from 1
    assert searched["from a layer"] == searched["whole"]
    assert (tmp_path / "from a layer.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()

    # the pieces: layer 1 alone, read from layer 0's outputs, gives the whole file's logits, bit for bit
    none, donor = tmp_path / "none.gguf", tmp_path / "all.gguf"
    quantize(f16, none, "q4_k_m")
    quantize(f16, donor, "q4_k_m", imatrix=importance)
    names = [n for n in importance.sums if n.startswith("blk.1.")]
    swap = TensorSwap(none, donor)
    swap.write(names, tmp_path / "whole-trial.gguf")
    swap.write(names, tmp_path / "later.gguf", from_layer=1)
    later = gguf_layout(tmp_path / "later.gguf")
    assert gguf_metadata(tmp_path / "later.gguf")["llama.block_count"] == 1
    assert {t.name for t in later.tensors} == {t.name.replace("blk.1.", "blk.0.") for t in gguf_layout(none).tensors
                                               if not t.name.startswith("blk.0.")}
    whole = {t.name: t for t in gguf_layout(tmp_path / "whole-trial.gguf").tensors}
    assert all(t.data.tobytes() == whole[t.name.replace("blk.0.", "blk.1.")].data.tobytes() for t in later.tensors)
    probe = KLProbe(f16, calibration.sequences[:8], tmp_path)
    keep = LayerInputs([1])
    base, _ = probe.kl_rows_and_answers(none, keep)
    assert keep.kept[1] and all(v.shape[1] == later.fields["llama.embedding_length"] for v in keep.kept[1].values())
    for z in (float("inf"), 3.0):
        assert probe.compare(tmp_path / "later.gguf", base, z=z, inputs=keep.at(1)) == \
            probe.compare(tmp_path / "whole-trial.gguf", base, z=z)
    with pytest.raises(EdgeloraError, match=r"^later\.gguf: no layers from 1 on to keep \(llama\.block_count is 1\)$"):
        TensorSwap(tmp_path / "later.gguf", tmp_path / "later.gguf").write([], tmp_path / "x.gguf", from_layer=1)
    assert not (tmp_path / "x.gguf").exists()


def test_a_fast_export_quantises_once_with_a_smaller_matrix(run_dir, tmp_path, monkeypatch):
    """--effort fast: the matrix from the effort's token budget, each quant llama.cpp's quantisation of
    the f16 with it (nothing made without it, no per-group trials, no answer checks), still verified."""
    import dataclasses

    from edgelora import exporter as E

    monkeypatch.setitem(E.EFFORTS, "fast", dataclasses.replace(E.EFFORTS["fast"], imatrix_tokens=200))
    out = tmp_path / "fast"
    r = run_cli("export", run_dir, "--quant", "f16", "--quant", "q4_k_m", "--effort", "fast", "--out", out)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["effort"] == "fast" and 200 <= manifest["imatrix"]["tokens"] < 200 + 64
    q4 = {o["role"]: o for o in manifest["outputs"]}["merged:q4_k_m"]
    assert q4["imatrix"] and q4["imatrix_check"] is None
    assert not {"probe", "measure", "answers", "trials"} & set(manifest["seconds"])
    assert {c["name"] for c in manifest["checks"]} >= {"template", "logits", "adapter", "stops"}
    again = tmp_path / "again.gguf"
    quantize(out / "tiny-run-f16.gguf", again, "q4_k_m", imatrix=IM.read(out / manifest["imatrix"]["file"]))
    assert again.read_bytes() == (out / "tiny-run-q4_k_m.gguf").read_bytes()
    r = run_cli("export", run_dir, "--effort", "quick", "--out", tmp_path / "no")
    assert r.exit_code == 2 and "'quick' is not one of 'fast', 'default', 'thorough'" in r.output


def test_the_trials_show_their_progress_with_an_eta(run_dir, tmp_path):
    """The per-group trials, the export's longest stage, count their groups with an estimate of the time left."""
    import re

    out = tmp_path / "o"
    r = run_cli("export", run_dir, "--quant", "q4_k_m", "--out", out)
    assert r.exit_code == 0, r.output
    groups = len(json.loads((out / "manifest.json").read_text())["outputs"][0]["imatrix_check"]["kl_by_group"])
    bars = re.findall(r"tiny-run-q4_k_m: the matrix by group: +\d+%\|[^|]*\| ([\d.]+)/([\d.]+) "
                      r"\[(\d\d:\d\d)<(\d\d:\d\d|\?)", r.output)
    done = [float(d) for d, *_ in bars]  # tqdm draws at most every 0.1 s: not every group need show
    assert len(done) >= 2 and done[0] == 0 and done == sorted(set(done)) and done[-1] <= groups
    assert {float(total) for _, total, *_ in bars} == {groups}
    assert all(re.fullmatch(r"\d\d:\d\d", left) for *_, left in bars[1:])  # once a group is done: the time left
