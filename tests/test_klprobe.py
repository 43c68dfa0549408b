"""KLProbe (edgelora.klprobe): a file's KL from the f16 and its answers, llama.cpp on both sides."""
import pytest


def test_a_probe_counts_the_held_out_prompts_a_file_answers_as_the_f16_does(tiny_export, run_dir, tmp_path):
    """The answers kept (kl_rows_and_answers) against llama-cpp-python's own temperature-0 sampling,
    prompt by prompt: the f16 keeps all of its own answers; the base without the adapter, only
    those it happens to share."""
    import llama_cpp

    from edgelora import exporter as E
    from edgelora.llamacpp import handles
    from edgelora.runtime import load

    plan = E.plan_export(str(run_dir), None, ["f16"], False, str(tmp_path / "plan"))
    calibration = E._calibration(plan, None, 0)
    f16, base = tiny_export["merged:f16"], tiny_export["base:f16"]
    probe = E._probe(f16, calibration)
    assert len(probe.prompts) == min(32, len(calibration.sequences))  # chat: every sequence has a prompt

    def answers(path):
        rt = load(path, n_ctx=probe.n_ctx)
        out = []
        for prompt, limit in probe.prompts:
            answer = []
            for token in rt.llm.generate(prompt, temp=0.0, reset=True):
                answer.append(token)
                if llama_cpp.llama_vocab_is_eog(handles(rt.llm)[2], token) or len(answer) == limit:
                    break
            out.append(answer)
        return out

    reference = answers(f16)
    assert probe.kl_rows_and_answers(f16)[1] == len(probe.prompts)
    for path in (tiny_export["merged:q8_0"], base):
        shared = sum(a == b for a, b in zip(answers(path), reference))
        assert probe.kl_rows_and_answers(path)[1] == shared
    assert shared < len(probe.prompts)  # the adapter changed the answers


def test_compare_settles_a_clear_difference_early_and_reads_all_for_the_exact_one(tiny_export, run_dir, tmp_path):
    """KLProbe.compare: with z = inf every sequence is read and the difference is measure's, exactly;
    a file far closer to the f16 than the base (q8_0 vs the base without the adapter) is settled on
    the first quarter of the sequences, with the same sign."""
    import math

    import numpy as np

    from edgelora import exporter as E

    plan = E.plan_export(str(run_dir), None, ["f16"], False, str(tmp_path / "plan"))
    f16, q8, base = tiny_export["merged:f16"], tiny_export["merged:q8_0"], tiny_export["base:f16"]
    probe = E._probe(f16, E._calibration(plan, None, 0))
    far = probe.kl_rows(base)
    assert np.concatenate(far).mean() == pytest.approx(probe.measure(base), rel=1e-9)
    total = sum(len(rows) for _, rows in probe.rows)
    exact, read = probe.compare(q8, far, z=math.inf)
    assert read == total and exact == pytest.approx(probe.measure(q8) - probe.measure(base), rel=1e-6, abs=1e-9)
    early, read = probe.compare(q8, far)
    assert exact < 0 and early < 0 and read < total / 2
    same, read = probe.compare(base, far)  # no difference at all: never settled, everything read
    assert same == 0 and read == total


def test_kl_and_answers_from_one_read_where_the_reference_answers_are_the_examples(tiny_export, run_dir, tmp_path):
    """kl_rows_and_answers: a prompt whose reference answer is its sequence's own answer, at rows
    the KL reads, is judged from that read; the rest are read again. The same KL as kl_rows and
    the same count as reading every prompt with its answer, for the f16 (all kept), q8_0 and the
    base without the adapter (fewer), with the probe's own positions budget cutting one sequence
    short."""
    import numpy as np

    from edgelora import exporter as E
    from edgelora.data import IGNORE
    from edgelora.klprobe import KLProbe, _follows

    plan = E.plan_export(str(run_dir), None, ["f16"], False, str(tmp_path / "plan"))
    f16, q8, base = tiny_export["merged:f16"], tiny_export["merged:q8_0"], tiny_export["base:f16"]
    answers = E._probe(f16, E._calibration(plan, None, 0)).reference_answers
    first = E._probe(f16, E._calibration(plan, None, 0)).prompts
    # the f16's own answers as the examples' answers: what a model trained to give them sees
    own = [(p + a, [IGNORE] * len(p) + a) for (p, _), a in zip(first, answers)]
    budget = sum(map(len, answers[:5])) - 1  # the fifth sequence's last answer position is not read
    probe = KLProbe(f16, own, tmp_path, max_positions=budget)
    probe.__dict__["reference_answers"] = answers  # as generated with the first probe's limits
    judged = set(probe._answers_in_rows)
    assert judged == {k for k in range(4) if answers[k]} and len(probe.prompts) > 5
    kept = []
    for path in (f16, q8, base):
        kl, n = probe.kl_rows_and_answers(path)
        np.testing.assert_allclose(np.concatenate(kl), np.concatenate(probe.kl_rows(path)), rtol=1e-5, atol=1e-7)
        with probe._load(path) as rt:  # every prompt read with its reference answer
            followed = _follows(rt, [p for p, _ in probe.prompts], answers)
        assert n == sum(f == len(a) for f, a in zip(followed, answers))
        kept.append(n)
    assert kept[0] == len(probe.prompts) and kept[2] < kept[0]
