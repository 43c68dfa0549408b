"""edgelora.layerwise: the model as trained, a decoder layer at a time, against PEFT's model loaded whole."""
import numpy as np
import pytest
import torch

from families import build_adapter, build_model
from edgelora import layerwise as LW


def whole_model(base, adapter, rows):
    """PEFT's model loaded whole, one sequence at a time: (with the adapter, without it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()

    def run():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0, at], -1).numpy() for ids, at in rows]

    with torch.no_grad():
        tuned = run()
        with model.disable_adapter():
            return tuned, run()


def random_rows(lengths, vocab=200, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(5, vocab, (n,), generator=gen).tolist(), list(range(n - 6, n))) for n in lengths]


@pytest.mark.parametrize("kind,lora", [("llama", {}), ("qwen2", {"use_dora": True}), ("qwen3", {"use_rslora": True}),
                                       ("gemma3_text", {}), ("phi3", {})])
def test_matches_the_whole_model(tmp_path, monkeypatch, kind, lora):
    """Tied and untied heads, DoRA and rsLoRA (PEFT's own arithmetic), Gemma-3's sliding windows
    (sequences longer than the window, right-padded in a pass), several passes."""
    base = build_model(tmp_path / kind, kind)
    adapter = build_adapter(base, tmp_path / "adapter", **lora)
    rows = random_rows([20, 37, 11, 30, 25])
    monkeypatch.setattr(LW, "TOKENS_PER_PASS", 64)  # passes of 2-3 sequences
    tuned, plain = LW.answer_logprobs(base, adapter, rows, adapter=(True, False))
    want_tuned, want_plain = whole_model(base, adapter, rows)
    for got, want in ((tuned, want_tuned), (plain, want_plain)):
        assert [g.shape for g in got] == [w.shape for w in want]
        assert max(np.abs(g - w).max() for g, w in zip(got, want)) < 1e-4
    assert max(np.abs(t - p).max() for t, p in zip(want_tuned, want_plain)) > 0.5  # the adapter does move them


def test_one_layer_in_memory_at_a_time(tmp_path, monkeypatch):
    """While a decoder layer runs, every other layer's weights are absent (meta), and none is left after."""
    base = build_model(tmp_path / "smollm3", "smollm3")  # 4 blocks
    adapter = build_adapter(base, tmp_path / "adapter")
    seen = []
    empty_model = LW._empty_model

    def watched(hf_dir, adapter_dir):
        model, weights = empty_model(hf_dir, adapter_dir)
        layers = model.get_base_model().model.layers

        def count(_module, _args):
            seen.append(sum(any(not p.is_meta for n, p in layer.named_parameters() if "lora_" not in n)
                            for layer in layers))
        for layer in layers:
            layer.register_forward_pre_hook(count)  # registered before _streamed's hooks: runs first
        watched.layers = layers
        return model, weights

    monkeypatch.setattr(LW, "_empty_model", watched)
    tuned, = LW.answer_logprobs(base, adapter, random_rows([12, 9]))
    assert len(tuned) == 2 and seen == [0] * 4  # the hook runs before this layer's weights are read
    assert all(p.is_meta for layer in watched.layers for n, p in layer.named_parameters() if "lora_" not in n)


def test_no_adapter(tmp_path):
    base = build_model(tmp_path / "llama", "llama")
    from transformers import AutoModelForCausalLM

    rows = random_rows([15, 8])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        want = [torch.log_softmax(model(torch.tensor([ids])).logits[0, at], -1).numpy() for ids, at in rows]
    got, = LW.answer_logprobs(base, None, rows)
    assert max(np.abs(g - w).max() for g, w in zip(got, want)) < 1e-4
