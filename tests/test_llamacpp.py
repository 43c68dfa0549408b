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
