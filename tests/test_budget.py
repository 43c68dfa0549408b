"""Per-tensor types to a size budget (edgelora.budget, `export --target-size / --target-bpw`)."""
import itertools
import json

import pytest

from edgelora import budget as B
from edgelora.errors import EdgeloraError
from edgelora.gguf_info import inspect_gguf
from tiny import assert_one_line_error, kept_of, run_cli


def test_the_hull_keeps_options_worth_taking():
    opts = [B.Option("Q2_K", 100, 50.0), B.Option("Q3_K", 150, 20.0), B.Option("Q4_0", 180, 25.0),  # dominated
            B.Option("Q4_K", 200, 12.0), B.Option("Q5_K", 300, 11.5),  # saves less per byte than Q6_K: skipped
            B.Option("Q6_K", 320, 2.0)]
    assert [o.qtype for o in B._lower_hull(opts)] == ["Q2_K", "Q3_K", "Q4_K", "Q6_K"]


def toy_options():
    return {
        "blk.0.attn_q.weight": [B.Option("Q2_K", 100, 40.0), B.Option("Q4_K", 200, 10.0), B.Option("Q8_0", 400, 1.0)],
        "blk.1.attn_q.weight": [B.Option("Q2_K", 100, 30.0), B.Option("Q4_K", 200, 8.0), B.Option("Q8_0", 400, 1.0)],
        "blk.0.ffn_down.weight": [B.Option("Q2_K", 300, 90.0), B.Option("Q4_K", 600, 20.0)],
        "token_embd.weight": [B.Option("Q4_0", 500, 5.0), B.Option("Q8_0", 900, 0.5)],
    }


CLASS_KL = {"attn_q": 0.7, "ffn_down": 0.45, "token_embd": 0.05}


def probe(types):
    """A stand-in for KLProbe: each class's KL when it alone is at its cheapest type."""
    (cls,) = {B.tensor_class(n) for n in types}
    return CLASS_KL[cls]


def cost(choice, options):
    return sum(choice.sensitivity[B.tensor_class(n)] * next(o.error for o in options[n] if o.qtype == t)
               for n, t in choice.types.items())


def test_choose_measures_sensitivity_and_keeps_to_the_budget():
    options = toy_options()
    overhead = 1000
    floor = overhead + B.SIZE_MARGIN + 1000
    at_floor = B.choose(options, floor, overhead, probe)
    assert all(t == options[n][0].qtype for n, t in at_floor.types.items())
    assert at_floor.sensitivity == pytest.approx({"attn_q": 0.7 / 70, "ffn_down": 0.45 / 90, "token_embd": 0.05 / 5})
    roomy = B.choose(options, floor + 10_000, overhead, probe)
    assert all(t == options[n][-1].qtype for n, t in roomy.types.items())
    previous = float("inf")
    for extra in range(0, 1800, 100):
        c = B.choose(options, floor + extra, overhead, probe)
        assert c.predicted_bytes + B.SIZE_MARGIN <= floor + extra
        assert c.predicted_kl == pytest.approx(cost(c, options)) and c.predicted_kl <= previous + 1e-12
        previous = c.predicted_kl
        # within the budget, no single remaining upgrade that would still fit saves more than it
        best = min(cost(B.Choice(dict(zip(options, combo)), 0, 0, c.sensitivity), options)
                   for combo in itertools.product(*[[o.qtype for o in opts] for opts in options.values()])
                   if overhead + B.SIZE_MARGIN + sum(next(o.nbytes for o in options[n] if o.qtype == t)
                                                     for n, t in zip(options, combo)) <= floor + extra)
        assert c.predicted_kl <= best * 1.6 + 1e-9  # greedy on convex hulls: close to the exhaustive optimum


def test_a_budget_below_the_floor_names_it():
    with pytest.raises(EdgeloraError, match=r"below the smallest file these types allow \(0\.1 MiB"):
        B.choose(toy_options(), 10_000, 1000, probe)


@pytest.fixture(scope="module")
def budgeted(tiny_export, tmp_path_factory):
    run = tiny_export["merged:f16"].parent.parent
    out = tmp_path_factory.mktemp("budget") / "ex"
    r = run_cli("export", run, "--quant", "q4_k_m", "--quant", "f16", "--target-size", "1MB", "--out", out)
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "manifest.json").read_text())


def test_the_budgeted_file_meets_the_target_and_reports_its_choice(budgeted):
    out, manifest = budgeted
    auto = next(o for o in manifest["outputs"] if o["role"] == "merged:auto")
    path = out / auto["file"]
    assert auto["file"] == "tiny-run-auto.gguf" and auto["fallbacks"]["count"] == 0
    check = auto["imatrix_check"]  # the budget's types made with and without the matrix: the better kept
    assert check["kl_kept"] == manifest["budget"]["measured_kl"]
    assert auto["imatrix"] == check["imatrix_kept"] == (kept_of(check) != "without")
    assert 900_000 <= path.stat().st_size <= 1_000_000
    info = inspect_gguf(path)
    b = manifest["budget"]
    assert b["target_bytes"] == 1_000_000 and b["size_bytes"] == path.stat().st_size
    assert b["class_types"] == info["class_types"] == auto["class_types"]
    assert set(b["sensitivity"]) == set(info["class_types"]) and all(v >= 0 for v in b["sensitivity"].values())
    assert 0 < b["measured_kl"] < 1 and b["predicted_kl"] > 0
    mixed = {t for types in info["class_types"].values() for t in types}
    assert len(mixed) >= 2  # really per-tensor: more than one type


def test_the_budgeted_file_runs_and_sits_in_the_bench(budgeted, tmp_path):
    from tiny import chat_rows, write_jsonl

    out, _ = budgeted
    evals = write_jsonl(tmp_path / "eval.jsonl", chat_rows(2))
    r = run_cli("bench", out, "--eval-data", evals, "--no-hf", "--max-tokens", 4, "--out", tmp_path / "bench")
    assert r.exit_code == 0, r.output
    labels = [row["label"] for row in json.loads((tmp_path / "bench" / "report.json").read_text())["rows"]]
    assert labels[0] == "f16" and "auto" in labels and "q4_k_m" in labels


def test_target_bpw_and_bad_requests(tiny_export, tmp_path):
    run = tiny_export["merged:f16"].parent.parent
    r = run_cli("export", run, "--quant", "f16", "--target-bpw", 5.0, "--out", tmp_path / "bpw", "--imatrix", "none")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "bpw" / "manifest.json").read_text())
    auto = next(o for o in manifest["outputs"] if o["role"] == "merged:auto")
    assert auto["bpw"] <= 5.0 + 0.3 and manifest["budget"]["target_bpw"] == 5.0  # bits over the weights
    assert_one_line_error(run_cli("export", run, "--quant", "auto", "--out", tmp_path / "x"),
                          "--quant auto needs a budget")
    assert_one_line_error(run_cli("export", run, "--target-size", "10KB", "--out", tmp_path / "y"),
                          "below the smallest file these types allow")
    assert not (tmp_path / "y" / "tiny-run-auto.gguf").exists()
    assert_one_line_error(run_cli("export", run, "--target-size", "1MB", "--target-bpw", 4, "--out", tmp_path / "z"),
                          "not both")
