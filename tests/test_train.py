import dataclasses
import json
from pathlib import Path

import pytest
import torch

from edgelora.config import load_config
from edgelora.errors import EdgeloraError
from edgelora.handoff import RunSummary
from edgelora.trainer import TrainingInterrupted, train
from tiny import build_model, cfg


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_lora_run_directory(request, arch, chat_file, tmp_path):
    base = request.getfixturevalue(arch)
    res = train(cfg(base, chat_file, tmp_path / "run", max_steps=8))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml", "metrics.jsonl", "summary.json"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows if "loss" in r)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 4  # before training, steps 3 and 6, and the last step
    assert evals[-1] < evals[0]  # it learns
    s = json.loads((run / "summary.json").read_text())
    assert s["method"] == "lora" and s["steps"] == 8 and len(s["base_sha256"]) == 64
    assert s["trainable_params"] == sum(p.numel() for n, p in _peft(base, run).named_parameters() if "lora_" in n)
    assert s["first_eval_loss"] == evals[0] and s["final_eval_loss"] == evals[-1]
    assert (run / "adapter" / "tokenizer.json").is_file() and (run / "adapter" / "chat_template.jinja").is_file()
    assert s["edgelora_schema"] == 1 and res.summary == RunSummary.read(run)
    assert {k: v for k, v in s.items() if k != "edgelora_schema"} == dataclasses.asdict(res.summary)


def _peft(base, run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "adapter")


def test_adapter_loads_in_plain_peft_and_changes_logits(tiny_llama, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM

    train(cfg(tiny_llama, chat_file, tmp_path / "run", targets="attn"))
    cfg_json = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert sorted(cfg_json["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits
    tuned = _peft(tiny_llama, tmp_path / "run")(ids).logits
    assert (tuned - plain).abs().max() > 1e-3


def test_qlora_on_cpu_dora_rslora(tiny_llama, chat_file, tmp_path):
    train(cfg(tiny_llama, chat_file, tmp_path / "run", method="qlora", dora=True, rslora=True, max_steps=3, device="cpu"))
    a = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert a["use_dora"] is True and a["use_rslora"] is True and a["r"] == 4 and a["lora_alpha"] == 8
    s = json.loads((tmp_path / "run/summary.json").read_text())
    assert s["method"] == "qlora" and s["device"] == "cpu" and s["compute_dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(tmp_path / "run/adapter/adapter_model.safetensors", "pt") as f:
        assert any("lora_magnitude_vector" in k for k in f.keys())


def test_qlora_eval_pass_keeps_gradients(tiny_llama):
    """An eval pass must not switch bitsandbytes to its CPU inference kernel (no backward)."""
    from edgelora.hf_model import load_model
    from edgelora.trainer import add_adapter

    c = load_config(None, {"rank": 4, "dropout": 0.0})
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])

    def first_layer_grad(eval_first: bool):
        torch.manual_seed(0)
        model = add_adapter(load_model(tiny_llama, "qlora", "cpu", torch.float32), c, "qlora")
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad.clone()

    assert torch.allclose(first_layer_grad(False), first_layer_grad(True), atol=1e-6)


def test_resume_gives_the_same_next_step_loss(tiny_llama, chat_file, tmp_path):
    kw = dict(max_steps=5, dropout=0.1, grad_accum=2, batch_size=2, eval_split=0.0)
    straight = []
    train(cfg(tiny_llama, chat_file, tmp_path / "a", **kw), on_step=lambda s, loss: straight.append(loss))

    resumed = []
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg(tiny_llama, chat_file, tmp_path / "b", **kw), on_step=lambda s, loss: resumed.append(loss) or s == 3)
    assert e.value.step == 3 and (e.value.checkpoint / "state.pt").is_file()
    assert not (tmp_path / "b" / "adapter").exists()
    train(cfg(tiny_llama, chat_file, tmp_path / "b", **kw), resume=True, on_step=lambda s, loss: resumed.append(loss))
    assert resumed[:3] == straight[:3]
    assert resumed[3:] == pytest.approx(straight[3:], rel=1e-5, abs=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert not (tmp_path / "b/checkpoints").exists()  # cleaned up after a finished run


def test_run_dir_guards(tiny_llama, chat_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(EdgeloraError, match="already exists; use --force"):
        train(cfg(tiny_llama, chat_file, out))
    with pytest.raises(EdgeloraError, match="not an edgelora run directory; refusing to delete"):
        train(cfg(tiny_llama, chat_file, out), force=True)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(EdgeloraError, match="--resume: no checkpoint found"):
        train(cfg(tiny_llama, chat_file, tmp_path / "fresh"), resume=True)


@pytest.mark.parametrize("base, data, folder", [
    ("smollm2-135m", "examples/data/extract_train.jsonl", "smollm2-135m-extract"),
    ("/models/Qwen3-0.6B/", "shop support.jsonl", "qwen3-0.6b-shop-support"),
    ("hub:HuggingFaceTB/SmolLM2-360M-Instruct", "data/train.jsonl", "smollm2-360m-instruct-train"),
    ("C:\\m\\SmolLM2-135M-Instruct.Q4_1.gguf", "tickets-training.jsonl", "smollm2-135m-instruct.q4-1-tickets"),
])
def test_a_run_is_named_for_its_base_and_data(base, data, folder):
    from edgelora.config import default_run_dir

    assert default_run_dir(base, data).as_posix() == f"runs/{folder}"


def test_train_without_out_writes_runs_base_data_and_export_names_the_files_so(tiny_llama, chat_file, tmp_path,
                                                                             monkeypatch):
    """No --out: runs/BASE-DATA, and the export's files and the model in them carry that name."""
    from edgelora.exporter import export
    from edgelora.gguf_info import inspect_gguf

    monkeypatch.chdir(tmp_path)
    result = train(dataclasses.replace(cfg(tiny_llama, chat_file, "x", max_steps=1), out=None))
    name = f"{tiny_llama.name}-chat"
    assert result.run_dir == Path("runs") / name and (tmp_path / "runs" / name / "summary.json").is_file()
    out = export(str(result.run_dir), quants=["f16"], imatrix="none", verify=False)
    assert inspect_gguf(out.out_dir / f"{name}-f16.gguf")["card"]["general.name"] == name


def test_resume_refuses_changed_config(tiny_llama, chat_file, tmp_path):
    with pytest.raises(TrainingInterrupted):
        train(cfg(tiny_llama, chat_file, tmp_path / "r"), on_step=lambda s, loss: True)
    with pytest.raises(EdgeloraError, match="--resume: 'rank' was 4 in .*config.yaml, now 8"):
        train(cfg(tiny_llama, chat_file, tmp_path / "r", rank=8), resume=True)


def test_unknown_target_names_the_layers(tiny_llama, chat_file, tmp_path):
    with pytest.raises(EdgeloraError, match="--targets: no linear layer named qkv .*q_proj"):
        train(cfg(tiny_llama, chat_file, tmp_path / "run", targets="qkv,q_proj"))


def test_lm_head_on_a_tied_model_is_refused_before_training(tiny_tokenizer, chat_file, tmp_path):
    tied = build_model(tmp_path / "tied", "llama", tiny_tokenizer, tie=True)
    with pytest.raises(EdgeloraError, match=r"^--targets lm_head: this model ties its output layer to the token "
                                            r"embedding \(tie_word_embeddings\).*leave lm_head out$"):
        train(cfg(tied, chat_file, tmp_path / "run", targets="q_proj,lm_head"))
    assert not (tmp_path / "run" / "adapter").exists()


def test_bad_data_fails_before_loading_the_model(chat_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(EdgeloraError, match="bad.jsonl:2: malformed JSON"):
        train(cfg(tmp_path / "no-such-model", bad, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _gemma3_softcapped(path, tokenizer):
    """A tiny gemma3_text model whose logits are soft-capped (final_logit_softcapping)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(3)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, final_logit_softcapping=5.0,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    Gemma3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _family(request, tiny_tokenizer, tmp_path, arch):
    """A tiny base: a fixture's, the soft-capped gemma3, or test_converter's model of a family."""
    if arch == "gemma3":
        return _gemma3_softcapped(tmp_path / "g", tiny_tokenizer)
    if arch in ("phi3", "smollm3"):
        from families import build_model

        return build_model(tmp_path / arch, arch, hidden=64)
    return request.getfixturevalue(arch)


@pytest.mark.parametrize("arch, method", [("tiny_llama", "lora"), ("tiny_qwen2", "lora"), ("tiny_llama", "qlora"),
                                          ("gemma3", "lora"), ("phi3", "lora"), ("smollm3", "qlora")])
def test_logits_only_at_targets_give_the_full_loss_and_gradients(request, tiny_tokenizer, tmp_path, monkeypatch,
                                                                  arch, method):
    """The LM head run only where the labels are (in chunks, recomputed in backward) gives the
    loss and the adapter's gradients of the model's own full logits (soft-capped for Gemma)."""
    import torch.nn.functional as F

    from edgelora import trainer as T
    from edgelora.data import IGNORE

    base = _family(request, tiny_tokenizer, tmp_path, arch)
    monkeypatch.setattr(T, "HEAD_CHUNK", 5)  # several chunks
    c = load_config(None, {"rank": 4, "dropout": 0.0, "targets": "all-linear"})
    torch.manual_seed(0)
    model = T.add_adapter(T.load_model(base, method, "cpu", torch.float32), c, method)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    ids = torch.randint(3, 200, (3, 12))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 9:11] = ids[1, 9:11]
    labels[2, 2:5] = ids[2, 2:5]
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    keep = labels[:, 1:] != IGNORE
    full = F.cross_entropy(logits[keep], labels[:, 1:][keep], reduction="sum")
    full_grads = grads(full)
    loss, n = T.summed_loss(model, ids, labels, mask)
    assert n == 11 and torch.allclose(loss, full, rtol=1e-5), (loss, full)
    for name, g in grads(loss).items():
        assert torch.allclose(g, full_grads[name], rtol=1e-4, atol=1e-6), name


def test_length_grouped_batches_keep_every_example_once_and_resume_exactly():
    import itertools
    import random

    from edgelora.trainer import micro_batches

    rng = random.Random(1)
    lengths = [rng.randint(10, 500) for _ in range(203)]
    per_epoch = 51  # ceil(203 / 4)
    grouped = list(itertools.islice(micro_batches(203, 4, seed=7, lengths=lengths), 3 * per_epoch))
    plain = list(itertools.islice(micro_batches(203, 4, seed=7), 3 * per_epoch))
    for batches in (grouped, plain):
        for e in range(3):
            epoch = batches[e * per_epoch:(e + 1) * per_epoch]
            assert sorted(i for b in epoch for i in b) == list(range(203))
    assert grouped[:per_epoch] != grouped[per_epoch:2 * per_epoch]  # a fresh shuffle each epoch

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 4
    widths = [max(lengths[i] for i in b) for b in grouped[:per_epoch]]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # not long-to-short or back
    for start in (0, 5, per_epoch - 1, per_epoch + 3):  # resuming at micro-batch `start`
        resumed = list(itertools.islice(micro_batches(203, 4, seed=7, start=start, lengths=lengths), 10))
        assert resumed == grouped[start:start + 10]


def test_gradient_checkpointing_is_chosen_from_the_memory(tiny_llama, chat_file, tmp_path, caplog):
    """Off where the activations fit (the tiny model: always), on under a --max-memory they do not
    fit, as asked when asked; the loss is the same either way (LoRA dropout on: the lean layers'
    masks and remade inputs under recomputation too)."""
    import logging

    caplog.set_level(logging.INFO, logger="edgelora")
    runs = {}
    for name, kw in (("auto", {}), ("tight", {"max_memory": "1KiB"}), ("asked", {"grad_checkpointing": True})):
        train(cfg(tiny_llama, chat_file, tmp_path / name, max_steps=2, eval_split=0.0, dropout=0.1, **kw))
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert [runs[n]["grad_checkpointing"] for n in ("auto", "tight", "asked")] == [False, True, True]
    assert "gradient checkpointing off (activations ~0.0 GiB without it, " in caplog.text
    assert "GiB free)" in caplog.text and "gradient checkpointing on (as asked)" in caplog.text
    assert "gradient checkpointing on (activations ~0.0 GiB without it, 0.0 GiB allowed)" in caplog.text
    assert runs["auto"]["final_loss"] == pytest.approx(runs["tight"]["final_loss"], rel=1e-5)
    with pytest.raises(EdgeloraError, match="max_memory must be a size such as 8GiB, not 'lots'"):
        load_config(None, {"data": str(chat_file), "max_memory": "lots"})


def test_two_processes_train_as_one_with_twice_the_batch(tiny_llama, tmp_path):
    """`torchrun --nproc_per_node 2 -m edgelora.cli train` (gloo on CPU, through Accelerate): each
    process takes half of every global batch, and the run matches one process with the whole batch,
    through an epoch whose last batch (1 of 21 examples) leaves the second process nothing."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from edgelora.config import save_config
    from tiny import chat_rows, write_jsonl

    data = write_jsonl(tmp_path / "chat21.jsonl", chat_rows(21))
    one = cfg(tiny_llama, data, tmp_path / "one", max_steps=7, batch_size=4, eval_split=0.0, save_every=2,
              grad_checkpointing=False)
    train(one)
    two = cfg(tiny_llama, data, tmp_path / "two", max_steps=7, batch_size=2, eval_split=0.0, save_every=2,
              grad_checkpointing=False)
    save_config(two, tmp_path / "two.yaml")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "edgelora.cli", "train", str(tmp_path / "two.yaml")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 7
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref]  # the same examples each step
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-4)
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not (tmp_path / "two" / "checkpoints").exists()  # written at step 2 by one process, removed at the end


def _fsdp_worker(rank: int, world: int, port: int, config: dict, stop_at, resume: bool) -> None:
    """One process of a `torchrun --nproc_per_node 2` launch (the environment torchrun sets)."""
    import os

    from edgelora.config import TrainConfig

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**config), resume=resume, on_step=None if stop_at is None else lambda s, _: s == stop_at)
    except TrainingInterrupted:
        pass


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp_shards_over_two_processes_resumes_and_trains_as_one(tiny_llama, tmp_path, checkpointing):
    """--fsdp with two CPU processes (gloo): stopped after step 3 (a checkpoint gathered from the
    shards), resumed to step 7, it matches one process with the whole batch: the same examples,
    losses and eval losses, and the same adapter; with gradient checkpointing too."""
    import dataclasses
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tiny import chat_rows, write_jsonl

    data = write_jsonl(tmp_path / "chat21.jsonl", chat_rows(21))
    common = dict(max_steps=7, eval_split=0.2, eval_every=3, save_every=100, grad_checkpointing=checkpointing)
    one = cfg(tiny_llama, data, tmp_path / "one", batch_size=4, **common)
    train(one)
    two = dataclasses.asdict(cfg(tiny_llama, data, tmp_path / "two", batch_size=2, fsdp=True, **common))
    for stop_at, resume in ((3, False), (None, True)):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_fsdp_worker, args=(2, port, two, stop_at, resume), nprocs=2, join=True)
        if stop_at:
            assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-0000003"]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["fsdp"] and summary["steps"] == 7
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows] == [sorted(r) for r in ref] and len(rows) == 1 + 7  # step 0's eval, 7 steps
    for key in ("tokens", "loss", "eval_loss"):
        assert [r.get(key, 0) for r in rows] == pytest.approx([r.get(key, 0) for r in ref], rel=1e-4), key
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_fsdp_refuses_one_process_and_a_4bit_base(tiny_llama, chat_file, tmp_path):
    with pytest.raises(EdgeloraError, match="--fsdp shards the model over several processes: launch with torchrun"):
        train(cfg(tiny_llama, chat_file, tmp_path / "r", fsdp=True))
    assert not (tmp_path / "r").exists()


def test_the_loss_curve_matches_a_plain_peft_loop_on_the_same_batches(tiny_llama, chat_file, tmp_path):
    """edgelora's loop (head only at targets, grouped batches, its own loss sum) against the plain
    PEFT loop: model(..., labels=...).loss on the same batches, AdamW, cosine schedule."""
    import random

    from transformers import get_cosine_schedule_with_warmup

    from edgelora import data as D
    from edgelora.hf_model import load_model, load_tokenizer
    from edgelora.trainer import add_adapter, collate, micro_batches

    c = cfg(tiny_llama, chat_file, tmp_path / "run", max_steps=5, batch_size=4, eval_split=0.0, method="lora",
            grad_checkpointing=False)
    ours = [r["loss"] for r in train(c).metrics if "loss" in r]

    tok = load_tokenizer(tiny_llama)
    items, _ = D.tokenize_all(tok, D.read_jsonl(chat_file)[0], c.seq_len)
    torch.manual_seed(c.seed)
    random.seed(c.seed)
    model = add_adapter(load_model(tiny_llama, "lora", "cpu", torch.float32), c, "lora", checkpointing=False,
                        lean_layers=False)  # the plain PEFT layers
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(opt, 1, 5)
    batches = micro_batches(len(items), 4, c.seed, lengths=[len(t.input_ids) for t in items])
    model.train()
    plain = []
    for _ in range(5):
        ids, labels, mask = collate([items[i] for i in next(batches)], tok.pad_token_id, "cpu")
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        plain.append(loss.item())
    assert ours == pytest.approx(plain, rel=2e-4) and ours[-1] < ours[0]


def test_qlora_leaves_no_weight_in_the_mapped_checkpoint(tiny_llama, monkeypatch):
    """bitsandbytes quantises the linear weights into new memory but leaves the embedding and norms
    as views of the mmapped safetensors file, which keeps the whole file mapped and every page read
    while loading resident; load_model copies them out (with the same values)."""
    from pathlib import Path

    from edgelora import hf_model

    if not Path("/proc/self/maps").exists():
        pytest.skip("needs Linux's /proc/self/maps")
    checkpoint = str((Path(tiny_llama) / "model.safetensors").resolve())

    def in_checkpoint(model):  # the parameters whose memory lies in a mapping of the checkpoint file
        spans = [[int(a, 16) for a in line.split()[0].split("-")]
                 for line in open("/proc/self/maps") if line.rstrip().endswith(checkpoint)]
        return [n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in spans)]

    with monkeypatch.context() as m:
        m.setattr(hf_model, "_leave_the_file", lambda model: None)
        mapped = hf_model.load_model(tiny_llama, "qlora", "cpu", torch.float32)
        assert "model.embed_tokens.weight" in in_checkpoint(mapped)  # what bitsandbytes leaves
    model = hf_model.load_model(tiny_llama, "qlora", "cpu", torch.float32)
    assert in_checkpoint(model) == []
    assert torch.equal(model.model.embed_tokens.weight, mapped.model.embed_tokens.weight)
    if model.config.tie_word_embeddings:  # the head still reads the (copied) embedding
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_dropout_linear_is_dropout_then_linear():
    """The fused LoRA dropout + lora_A: the output and both gradients of F.linear(dropout(x), W)
    with the same mask (keep_mask from torch's generator), and plain F.linear in eval."""
    import torch.nn.functional as F

    from edgelora.lean import DropoutLinear, keep_mask

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 4, bias=False)
    fused = DropoutLinear(linear, 0.3)
    assert fused.weight is linear.weight
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad = torch.randn(3, 5, 4)
    torch.manual_seed(7)
    out = fused(x)
    got = torch.autograd.grad(out, (x, linear.weight), grad)
    torch.manual_seed(7)
    keep = keep_mask(x.shape, 0.3)
    assert 0.15 < 1 - keep.float().mean() < 0.45
    ref = F.linear(x * keep / (1 - 19661 / 2**16), linear.weight)  # p rounded to 19661 / 65536
    want = torch.autograd.grad(ref, (x, linear.weight), grad)
    assert torch.allclose(out, ref, atol=1e-6)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
    fused.eval()
    assert torch.equal(fused(x), F.linear(x, linear.weight))


def test_keep_mask_drops_p_of_the_elements_independently():
    """keep_mask: seeded, its own draw each call, drops p (rounded to 1/65536) of the elements of any
    shape, each of the four 16-bit lanes of a 64-bit draw alike, none at p = 0."""
    from edgelora.lean import keep_mask

    torch.manual_seed(1)
    a = keep_mask(torch.Size([999, 1001]), 0.05)
    torch.manual_seed(1)
    assert torch.equal(a, keep_mask(torch.Size([999, 1001]), 0.05))
    assert a.shape == (999, 1001) and a.dtype == torch.bool
    assert not torch.equal(a, keep_mask(torch.Size([999, 1001]), 0.05))
    lanes = 1 - a.flatten()[:999 * 1000].view(-1, 4).float().mean(0)  # the drop rate of each 16-bit lane
    assert torch.allclose(lanes, torch.full((4,), 3277 / 2**16), atol=0.002), lanes
    same = (a.flatten()[:-1] == a.flatten()[1:]).float().mean()  # neighbours independent: P(equal) = p² + (1-p)²
    assert abs(same - (0.05**2 + 0.95**2)) < 0.002
    assert keep_mask(torch.Size([3, 5]), 0.0).all()


@pytest.mark.parametrize("arch, method", [("tiny_llama", "qlora"), ("tiny_qwen2", "lora"), ("gemma3", "lora"),
                                          ("smollm3", "lora")])
def test_lean_layers_keep_the_math_and_less_memory(request, tiny_tokenizer, tmp_path, monkeypatch, arch, method):
    """With the lean layers (fused LoRA dropout, gated MLP product recomputed, LoRA inputs remade
    from their recipes): without dropout the same loss and adapter gradients; with dropout the same
    eval logits and adapter keys, a training forward that does drop, the same loss and gradients
    (the same masks) as without the recipes, and under 60% of the activation bytes autograd keeps."""
    from edgelora import lean as L
    from edgelora import trainer as T

    base = _family(request, tiny_tokenizer, tmp_path, arch)
    ids = torch.randint(3, 200, (2, 24))
    labels = ids.clone()
    mask = torch.ones_like(ids)

    def build(dropout, lean_layers):
        c = load_config(None, {"rank": 4, "dropout": dropout, "targets": "all-linear"})
        torch.manual_seed(0)
        model = T.add_adapter(T.load_model(base, method, "cpu", torch.float32), c, method, checkpointing=False,
                              lean_layers=lean_layers)
        for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        return model

    def loss_and_grads(model):
        model.zero_grad()
        loss, _ = T.summed_loss(model, ids, labels, mask)
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = loss_and_grads(build(0.0, False))
    lean_loss, lean_grads = loss_and_grads(build(0.0, True))
    assert torch.allclose(lean_loss, plain_loss, rtol=1e-5)
    assert plain_grads.keys() == lean_grads.keys()
    for name, g in lean_grads.items():
        assert torch.allclose(g, plain_grads[name], rtol=1e-4, atol=1e-6), name

    def kept_bytes(model):  # activations: storages autograd keeps that are not the model's own
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            T.summed_loss(model, ids, labels, mask)
        return sum(storages.values())

    plain, lean = build(0.1, False), build(0.1, True)
    assert plain.state_dict().keys() == lean.state_dict().keys()
    assert any(type(m).__name__ == "DropoutLinear" for m in lean.modules())
    torch.manual_seed(3)
    remade_loss, remade_grads = loss_and_grads(lean)
    remade_bytes = kept_bytes(lean)
    with monkeypatch.context() as m:
        m.setattr(L, "recomputable", lambda out, fn, *inputs: out)  # the LoRA branches keep their inputs
        torch.manual_seed(3)
        kept_loss, kept_grads = loss_and_grads(lean)
        assert remade_bytes < 0.9 * kept_bytes(lean)
    assert torch.allclose(remade_loss, kept_loss, rtol=1e-6)
    for name, g in remade_grads.items():  # float rounding: the norm's input gradient is summed in another order
        assert torch.allclose(g, kept_grads[name], rtol=1e-4, atol=1e-5), name
    assert remade_bytes < 0.6 * kept_bytes(plain)
    with torch.no_grad():
        plain.eval(), lean.eval()
        eval_logits = lean(input_ids=ids).logits
        assert torch.allclose(eval_logits, plain(input_ids=ids).logits, atol=1e-5)
    lean.train()
    assert not torch.allclose(lean(input_ids=ids).logits, eval_logits, atol=1e-4)  # dropout applied
