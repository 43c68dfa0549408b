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
