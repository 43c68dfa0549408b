import pytest

from edgelora import llamacpp


@pytest.mark.parametrize("amx, env, expected", [
    (False, None, True), (True, None, False), (True, "1", True), (False, "0", False),
])
def test_extra_buffer_policy(monkeypatch, amx, env, expected):
    monkeypatch.setattr(llamacpp, "cpu_advertises_amx", lambda: amx)
    if env is None:
        monkeypatch.delenv("EDGELORA_LLAMA_EXTRA_BUFTS", raising=False)
    else:
        monkeypatch.setenv("EDGELORA_LLAMA_EXTRA_BUFTS", env)
    assert llamacpp.use_extra_bufts() is expected
    import llama_cpp.llama_cpp as C

    before = C.llama_model_default_params
    with llamacpp.model_params_policy():
        if expected:  # nothing patched: llama.cpp's own defaults apply
            assert C.llama_model_default_params is before
        else:
            assert C.llama_model_default_params().use_extra_bufts is False
    assert C.llama_model_default_params is before


def test_a_llama_without_the_private_handles_is_one_clear_error():
    """The handles edgelora reaches into are checked in one place: a llama-cpp-python that moved
    them stops with a line naming its version, not an AttributeError deep in a command."""
    from types import SimpleNamespace

    import llama_cpp

    from edgelora.errors import EdgeloraError

    moved = SimpleNamespace(_ctx=SimpleNamespace(ctx=1), _batch=None)
    with pytest.raises(EdgeloraError, match=rf"^llama-cpp-python {llama_cpp.__version__} keeps a model's handles "
                                            r"elsewhere .*_model.*llama-cpp-python==0\.3\.36$"):
        llamacpp.handles(moved)


@pytest.mark.parametrize("sequences", [1, 16])
def test_batched_logits_are_each_sequence_read_alone(wider_gguf, sequences):
    """Several sequences to a batch (each its own in the KV cache), only the rows asked for through the
    output head, one longer than a batch read in parts: the same logits as reading each alone, every row."""
    import numpy as np

    llm = llamacpp.load_llama(wider_gguf, n_ctx=512, n_batch=32, n_ubatch=32, sequences=sequences, verbose=False)
    seqs = [[1, 5, 9, 13, 2, 7], [3, 4, 4, 8], list(range(1, 70)), [6, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    rows = [[0, 5], None, [0, 31, 32, 68], [9]]  # the third is longer than a batch: rows on both sides of a part
    seen = []
    got = llamacpp.logits_at(llm, seqs, rows)
    for _ in llamacpp.batched_logits(llm, seqs, rows, before=seen.append):
        pass
    oracle = llamacpp.load_llama(wider_gguf, n_ctx=512, n_batch=512, logits_all=True, verbose=False)
    for ids, want, logits in zip(seqs, rows, got):
        oracle.reset()
        oracle.eval(ids)  # llama-cpp-python's own evaluation, every row kept
        alone = np.array(oracle.scores[:len(ids)], dtype=np.float32)
        np.testing.assert_allclose(logits, alone[np.arange(len(ids)) if want is None else want], rtol=1e-4, atol=1e-4)
    parts = [part for batch in seen for part in batch]
    assert sorted((i, first) for i, first, _ in parts) == [(0, 0), (1, 0), (2, 0), (2, 32), (2, 64), (3, 0)]
    assert all(len(batch) == 1 for batch in seen) == (sequences == 1)
    assert sum(n for _, _, n in parts) == sum(map(len, seqs))


def test_shared_prefix_stops_before_a_wanted_row_and_a_last_token():
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4]]
    assert llamacpp.shared_prefix(seqs, [9, 9, 9]) == 3
    assert llamacpp.shared_prefix(seqs, [9, 2, 9]) == 2  # the second wants the logits at position 2
    assert llamacpp.shared_prefix([[1, 2], [1, 2]], [9, 9]) == 1  # each keeps a token of its own to read
    assert llamacpp.shared_prefix([[1, 2, 3]], [9]) == 0  # one sequence: nothing to share
    assert llamacpp.shared_prefix([[4, 2], [1, 2]], [9, 9]) == 0


@pytest.mark.parametrize("sequences", [1, 16])
@pytest.mark.parametrize("rows, shared", [
    ([[12, 13], [12, 14, 15], [12, 40, 70], [9]], 9),  # the shortest has 9 tokens in common with the rest
    ([[12, 13], [5, 15], [12, 40, 70], [9]], 5),  # a row asked for at 5: the first 5 shared
    ([[12, 13], [12, 15], None, [9]], 0),  # every row of the third: nothing shared
])
def test_a_prefix_every_sequence_shares_is_read_once(wider_gguf, monkeypatch, sequences, rows, shared):
    """Sequences that begin alike (a system prompt, an instruction) have that beginning read once: each
    sequence's logits at its rows are those of reading it alone (one longer than a batch too), and a row
    asked for inside the common beginning keeps it out of what is shared."""
    import numpy as np

    llm = llamacpp.load_llama(wider_gguf, n_ctx=512, n_batch=32, n_ubatch=32, sequences=sequences, verbose=False)
    common = [1, 5, 9, 13, 2, 7, 7, 3, 11, 4, 6, 12]
    seqs = [common + [3, 4], common + [8, 8, 2, 5], common + list(range(1, 60)), common[:9] + [20]]
    read, decode = [], llamacpp._decode
    monkeypatch.setattr(llamacpp, "_decode", lambda llm_, entries, *more: read.append(len(entries)) or decode(llm_, entries, *more))
    got = llamacpp.logits_at(llm, seqs, rows)
    assert sum(read) == sum(map(len, seqs)) - shared * (len(seqs) - 1)
    oracle = llamacpp.load_llama(wider_gguf, n_ctx=512, n_batch=512, logits_all=True, verbose=False)
    # packed, a sequence's cells sit elsewhere in the unified cache than read alone, and llama.cpp's CPU
    # attention sums in cache order (partly in f16): 1e-3 apart; a cell of another sequence seen moves
    # these logits (up to 5.4) by about 1
    tolerance = 1e-4 if sequences == 1 else 1e-2
    for ids, want, logits in zip(seqs, rows, got):
        oracle.reset()
        oracle.eval(ids)
        alone = np.array(oracle.scores[:len(ids)], dtype=np.float32)
        np.testing.assert_allclose(logits, alone[np.arange(len(ids)) if want is None else want],
                                   rtol=tolerance, atol=tolerance)


def test_weight_inputs_see_every_token_of_every_weight(wider_gguf):
    """WeightInputs: while active, each blk.* weight's input once per token, a row each; q, k and v share one array."""
    import numpy as np

    seen: dict[str, list] = {}
    observer = llamacpp.WeightInputs(lambda name: name.startswith("blk."),
                                     lambda name, x: seen.setdefault(name, []).append(x))
    llm = llamacpp.load_llama(wider_gguf, n_ctx=256, observe=observer, verbose=False)
    llamacpp.all_logits(llm, [1, 2, 3])  # not active: nothing seen
    assert not seen
    observer.active = True
    llamacpp.all_logits(llm, [1, 2, 3, 4, 5])
    observer.active = False
    observer.raise_error()
    assert "blk.0.attn_q.weight" in seen and "blk.0.ffn_down.weight" in seen
    assert all(sum(len(x) for x in xs) == 5 for xs in seen.values())
    assert seen["blk.0.attn_q.weight"][0] is seen["blk.0.attn_k.weight"][0]
    assert all(x.dtype == np.float32 and np.isfinite(x).all() for xs in seen.values() for x in xs)


def test_greedy_many_answers_as_greedy_does_one_by_one(wider_gguf):
    """Prompts answered together (one batch a step, each its own sequence; more prompts than sequences,
    and a context that holds only some at a time) give each prompt's one-at-a-time greedy answer, as
    llama-cpp-python's own temperature-0 generation gives it."""
    llm = llamacpp.load_llama(wider_gguf, n_ctx=256, n_batch=64, sequences=3, verbose=False)
    prompts = [[1, 5, 9, 13], [1, 5, 9, 8, 2, 2, 7], [6], list(range(1, 60)), [9, 9, 9, 1]]  # two begin alike
    limits = [120, 120, 30, 5, 0]  # the first two fill the context: the third waits for the next group
    together = llamacpp.greedy_many(llm, prompts, limits)
    import llama_cpp

    vocab = llamacpp.handles(llm)[2]

    def generated(prompt, limit):
        out = []
        for token in (llm.generate(prompt, temp=0.0, reset=True) if limit else ()):
            out.append(token)
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(out) == limit:
                break
        return out

    alone = [generated(p, n) for p, n in zip(prompts, limits)]
    same = 0
    for prompt, a, b in zip(prompts, together, alone):
        split = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
        if split is None:
            assert a == b
            same += 1
            continue
        # batched and one-token arithmetic round differently: they may part only at a near-tie
        logits = llamacpp.all_logits(llm, prompt + b[:split])[-1]
        assert abs(logits[a[split]] - logits[b[split]]) < 1e-2 and split > 20
    assert same >= 4
    assert len(together[-1]) == 0 and all(0 < len(a) <= n for a, n in zip(together[:-1], limits))


def test_greedy_many_takes_a_read_continuation_as_far_as_the_greedy_answer_goes(wider_gguf, monkeypatch):
    """A read continuation is the answer's draft: the tokens the greedy answer begins with are taken
    from that read, not decoded again a step at a time, and the answers are the greedy ones whatever
    the draft (the whole answer, a part then another token, longer than the limit, one token of a
    limit of 0). Counted: every token decoded, against generating without drafts."""
    llm = llamacpp.load_llama(wider_gguf, n_ctx=512, n_batch=64, sequences=3, verbose=False)
    prompts = [[1, 5, 9, 13], [1, 5, 9, 8, 2, 2, 7], [6], list(range(1, 60)), [9, 9, 9, 1]]
    limits = [40, 40, 30, 5, 0]
    decoded = []
    real = llamacpp._decode
    monkeypatch.setattr(llamacpp, "_decode", lambda llm, entries: decoded.append(len(entries)) or real(llm, entries))
    plain = llamacpp.greedy_many(llm, prompts, limits)
    plain_tokens, decoded[:] = sum(decoded), []
    assert len(plain[1]) > 11
    other = (plain[1][10] + 1) % llm.n_vocab()
    drafts = [plain[0], plain[1][:10] + [other, 3, 3], plain[2] + [1, 2, 3], plain[3][:2], [5]]
    drafted = llamacpp.greedy_many(llm, prompts, limits, read=drafts)
    assert drafted == plain
    taken = [len(plain[0]) - 1, 10, len(plain[2]) - 1, 1, 0]  # the last token of each is the loop's
    assert sum(decoded) == plain_tokens + sum(map(len, drafts)) - sum(taken)


def test_greedy_many_reads_a_continuation_first_and_answers_from_the_prompt(wider_gguf):
    """With `read`, each prompt's continuation is scored on the way (the logits at the prompt's last
    token and at each read token but the last, as reading prompt + continuation alone gives them,
    handed over in the prompts' order); what of it the greedy answer is not leaves the cache: the
    greedy answers are those generated from the prompts alone."""
    import numpy as np

    llm = llamacpp.load_llama(wider_gguf, n_ctx=512, n_batch=64, sequences=3, verbose=False)
    prompts = [[1, 5, 9, 13], [1, 5, 9, 8, 2, 2, 7], [6], list(range(1, 60)), [9, 9, 9, 1]]  # two begin alike
    read = [[7, 7, 2], [], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4], [3], [2, 8]]
    limits = [40, 40, 30, 5, 0]
    plain = llamacpp.greedy_many(llm, prompts, limits)
    seen = []
    scored = llamacpp.greedy_many(llm, prompts, limits, read=read, on_read=lambda i, lg: seen.append((i, lg)))
    assert scored == plain
    assert [i for i, _ in seen] == [0, 2, 3, 4]  # the prompts' order; none for an empty continuation
    for i, logits in seen:
        alone = llamacpp.all_logits(llm, prompts[i] + read[i])
        want = alone[len(prompts[i]) - 1:len(prompts[i]) + len(read[i]) - 1]
        assert logits.shape == want.shape
        np.testing.assert_allclose(logits, want, rtol=1e-3, atol=1e-3)
