import json
import re

import pytest

from edgelora import data as D
from edgelora.errors import EdgeloraError
from tiny import REASONING_TEMPLATE, THINKING_TEMPLATE, chat_rows, write_jsonl


def test_shapes_detected_and_normalised(tmp_path):
    chat = write_jsonl(tmp_path / "c.jsonl", chat_rows(2))
    inst = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"},
                                              {"instruction": "Say hi", "output": "hi"}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    ex, shape = D.read_jsonl(chat)
    assert shape == "chat" and ex[0].messages[1] == {"role": "assistant", "content": "0 plus 0 is 0."}
    ex, shape = D.read_jsonl(inst)
    assert shape == "instruction"
    assert ex[0].messages == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert ex[1].messages[0]["content"] == "Say hi"
    ex, shape = D.read_jsonl(text)
    assert shape == "text" and ex[0].text == "hello world" and ex[0].source.endswith("t.jsonl:1")


def test_shape_override_applies_to_every_line(tmp_path):
    # Both keys present: auto picks chat; --format text reads the text field instead.
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": "plain", "messages": [{"role": "assistant", "content": "a"}]}])
    assert D.read_jsonl(f)[1] == "chat"
    ex, shape = D.read_jsonl(f, "text")
    assert shape == "text" and ex[0].text == "plain"


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "broken"'], "bad.jsonl:2: malformed JSON"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}'],
     "bad.jsonl:1: messages[1] has role 'bot'"),
    (['{"instruction": "do it"}'], "bad.jsonl:1: missing field 'output'"),
    (['{"text": "a"}', '{"txt": "b"}'], "bad.jsonl:2: missing field 'text'"),
    (['{"prompt": "a"}'], "bad.jsonl:1: cannot tell the data shape (keys: prompt)"),
    (['[1, 2]'], "bad.jsonl:1: each line must be a JSON object"),
    (['{"messages": [{"role": "user", "content": "only a question"}]}'], "bad.jsonl:1: no assistant message"),
    (['{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}'],
     "bad.jsonl:1: messages[0].content must be a string"),
    (['', '  '], "bad.jsonl: empty data file"),
])
def test_bad_input_names_file_and_line(tmp_path, lines, message):
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(EdgeloraError) as e:
        D.read_jsonl(f)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(EdgeloraError, match="nope.jsonl: data file not found"):
        D.read_jsonl(tmp_path / "nope.jsonl")


def _spans(tok, t: D.Tokenized):
    """Decode the trained (unmasked) and untrained (masked) tokens separately."""
    trained = tok.decode([i for i, l in zip(t.input_ids, t.labels) if l != D.IGNORE])
    masked = tok.decode([i for i, l in zip(t.input_ids, t.labels) if l == D.IGNORE])
    return trained, masked


def test_completion_only_masking_multi_turn(tiny_tokenizer):
    ex = D.Example("x:1", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question?"}, {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question?"}, {"role": "assistant", "content": "Second answer."},
    ])
    t = D.tokenize_example(tiny_tokenizer, ex)
    trained, masked = _spans(tiny_tokenizer, t)
    # Exactly the answers and their end-of-turn markers are trained on, in order.
    assert trained == "First answer.<|im_end|>\nSecond answer.<|im_end|>\n"
    for part in ("Be brief.", "First question?", "Second question?", "<|im_start|>assistant\n"):
        assert part in masked
    assert "answer" not in masked
    # The whole sequence is the rendered template, tokenised once.
    assert tiny_tokenizer.decode(t.input_ids) == tiny_tokenizer.apply_chat_template(ex.messages, tokenize=False)


def test_text_data_trains_on_all_tokens(tiny_tokenizer):
    t = D.tokenize_example(tiny_tokenizer, D.Example("x:1", text="The quick brown fox."))
    assert t.labels == t.input_ids
    assert t.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_truncation_counted_and_all_truncated_is_an_error(tiny_tokenizer):
    long_q = D.Example("f.jsonl:1", messages=[{"role": "user", "content": "word " * 200},
                                               {"role": "assistant", "content": "ok"}])
    short = D.Example("f.jsonl:2", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok " * 50}])
    items, stats = D.tokenize_all(tiny_tokenizer, [long_q, short], seq_len=60)
    assert stats.truncated == 2 and stats.dropped == 1 and len(items) == 1
    assert len(items[0].input_ids) == 60 and items[0].n_targets > 0
    with pytest.raises(EdgeloraError, match=r"f.jsonl: all 1 examples were truncated away at --seq-len 60 .*f.jsonl:1"):
        D.tokenize_all(tiny_tokenizer, [long_q], seq_len=60, what="f.jsonl")


def test_eval_split_is_fixed_by_seed():
    ex = [D.Example(f"f:{i}", text=str(i)) for i in range(20)]
    a_train, a_eval = D.split_eval(ex, 0.25, seed=3)
    b_train, b_eval = D.split_eval(ex, 0.25, seed=3)
    _, c_eval = D.split_eval(ex, 0.25, seed=4)
    assert [e.source for e in a_eval] == [e.source for e in b_eval]
    assert len(a_eval) == 5 and len(a_train) == 15
    assert {e.source for e in a_eval} != {e.source for e in c_eval}
    assert not {e.source for e in a_eval} & {e.source for e in a_train}


def test_chatml_fallback_for_tokenizer_without_template(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    assert D.ensure_chat_template(tok) == "ChatML"  # its vocabulary has ChatML's tokens
    assert D.ensure_chat_template(tok) is None
    text = tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("specials, name, rendered", [
    (["<unk>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "Gemma",
     "<start_of_turn>user\nbe brief\n\nq<end_of_turn>\n<start_of_turn>model\na<end_of_turn>\n"),
    (["<unk>", "</s>"], "ChatML closed by EOS",
     "<|im_start|>system\nbe brief</s>\n<|im_start|>user\nq</s>\n<|im_start|>assistant\na</s>\n"),
])
def test_the_fallback_template_ends_turns_with_a_token_of_the_vocabulary(tmp_path, specials, name, rendered):
    """A base without a template and without ChatML's tokens gets turns that end with one token
    (its own turn marker, or its EOS), which llama.cpp stops at."""
    from tiny import build_tokenizer

    tok = build_tokenizer(tmp_path, specials=specials)
    assert tok.chat_template is None
    assert D.ensure_chat_template(tok) == name
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}]
    assert tok.apply_chat_template(messages, tokenize=False) == rendered
    t = D.tokenize_example(tok, D.Example("f:1", messages))
    answer = [i for i, label in zip(t.input_ids, t.labels) if label != -100]
    assert tok.convert_ids_to_tokens(answer)[-2:] == [specials[-1] if name == "Gemma" else "</s>", "Ċ"]


# Qwen3's way with reasoning, in brief: the answer of the last turn opens with its <think> block
# (empty when there was none); the generation prompt leaves the turn open for one, or with
# enable_thinking false closes an empty one first.
def test_a_thinking_template_defaults_to_no_think_for_data_without_reasoning(tiny_tokenizer):
    """Answers without <think>: the template's no-think variant becomes the default, so training
    learns the answer alone after the empty think block the prompt closes (not to write an empty
    block itself); answers with reasoning keep the template as it is."""
    import copy

    plain = D.Example("t:1", messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    reasoned = D.Example("t:2", messages=[{"role": "user", "content": "3+3?"},
                                          {"role": "assistant", "content": "<think>add</think>6"}])
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = THINKING_TEMPLATE
    assert not D.default_to_no_think(tok, [plain, reasoned]) and tok.chat_template == THINKING_TEMPLATE
    learnt = tok.decode([t for t in D.tokenize_example(tok, plain).labels if t != D.IGNORE])
    assert learnt.startswith("<think>\n\n</think>\n\n4")  # as given: the model would learn to write the block
    assert D.default_to_no_think(tok, [plain]) and tok.chat_template == D.NO_THINK + THINKING_TEMPLATE
    assert not D.default_to_no_think(tok, [plain])  # once
    t = D.tokenize_example(tok, plain)
    assert tok.decode([i for i in t.labels if i != D.IGNORE]) == "4<|im_end|>\n"
    assert tok.decode(t.input_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n")
    assert tok.apply_chat_template(plain.messages[:1], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=True).endswith("assistant\n")  # still switchable


# THINKING_TEMPLATE with Qwen3's reading of reasoning_content: the last answer's <think> block holds it.
def test_reasoning_content_is_trained_on_where_the_template_renders_it(tiny_tokenizer, tmp_path):
    """An assistant message's reasoning_content is kept, rendered by a template that reads it (as
    Qwen3's does) and learnt with the answer, keeping the thinking template's default; a template
    that renders none of it, or a reasoning field elsewhere, is refused naming the line."""
    import copy

    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "3+3?"},
                                             {"role": "assistant", "content": "6", "reasoning_content": "add 3"}]}) + "\n")
    (ex,), _ = D.read_jsonl(path)
    assert ex.messages[1] == {"role": "assistant", "content": "6", "reasoning_content": "add 3"}
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = REASONING_TEMPLATE
    assert not D.default_to_no_think(tok, [ex]) and tok.chat_template == REASONING_TEMPLATE
    t = D.tokenize_example(tok, ex)
    assert tok.decode([i for i in t.labels if i != D.IGNORE]) == "<think>\nadd 3\n</think>\n\n6<|im_end|>\n"
    tok.chat_template = THINKING_TEMPLATE  # does not read reasoning_content
    with pytest.raises(EdgeloraError, match=rf"^{re.escape(str(path))}:1: has reasoning_content, which this base's "
                                            r"chat template does not render; put the reasoning in the answer"):
        D.tokenize_example(tok, ex)
    for bad, where in (({"role": "user", "content": "q", "reasoning_content": "x"}, 0),
                       ({"role": "assistant", "content": "a", "reasoning_content": 3}, 1)):
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        msgs[where] = bad
        path.write_text(json.dumps({"messages": msgs}) + "\n")
        with pytest.raises(EdgeloraError, match=rf"^{re.escape(str(path))}:1: messages\[{where}\].reasoning_content "
                                                r"must be a string on an assistant message$"):
            D.read_jsonl(path)
