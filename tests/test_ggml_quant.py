"""edgelora.ggml_quant: llama.cpp's own quantiser and dequantiser on one tensor, checked against
gguf-py's independent numpy implementation of the same formats."""
from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import pytest

from edgelora.errors import EdgeloraError
from edgelora.ggml_quant import _ggml, dequantize, fits, quantization_error, quantize_rows

Q = gguf.GGMLQuantizationType


def weights(rows=64, cols=512, seed=0):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


def test_q8_0_matches_gguf_py_byte_for_byte():
    w = weights()
    q = quantize_rows(w, "Q8_0")
    assert np.array_equal(q.reshape(w.shape[0], -1), gguf.quants.quantize(w, Q.Q8_0))
    back = dequantize(q, "q8_0", w.shape)
    assert np.array_equal(back, gguf.quants.dequantize(q.reshape(w.shape[0], -1), Q.Q8_0))
    size, err = quantization_error(w, "Q8_0")
    assert size == q.size
    assert err == pytest.approx(np.sum(np.square(w.astype(np.float64) - back)), rel=1e-9)
    assert 0 < err < 1e-4 * np.sum(np.square(w.astype(np.float64)))


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q4_0", "Q4_K", "Q2_K", "Q6_K", "IQ4_NL", "IQ4_XS", "F16"])
def test_size_is_ggml_row_size_and_gguf_block_arithmetic(name):
    w = weights(rows=7, cols=768)
    block, type_size = gguf.GGML_QUANT_SIZES[Q[name]]
    expect = 7 * 768 // block * type_size
    assert quantize_rows(w, name).size == expect == 7 * _ggml().ggml_row_size(Q[name], 768)
    assert quantization_error(w, name)[0] == expect


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q4_K", "Q6_K", "Q2_K", "IQ4_NL", "IQ4_XS", "BF16"])
def test_ggml_to_float_agrees_with_gguf_py(name):
    w = weights(rows=8, cols=512, seed=1)
    q = quantize_rows(w, name)
    ours = dequantize(q, name, w.shape)
    theirs = gguf.quants.dequantize(q.reshape(8, -1), Q[name])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)
    for threads in (2, 3, 16):  # rows split unevenly, and more threads than rows: the same values
        assert np.array_equal(dequantize(q, name, w.shape, threads=threads), ours), threads


def test_error_falls_with_bits():
    w = weights(rows=128, cols=1024, seed=2)
    err = {t: quantization_error(w, t)[1] for t in ("Q8_0", "Q6_K", "Q5_0", "Q4_0", "Q4_K", "IQ4_NL", "Q2_K")}
    assert err["Q8_0"] < err["Q6_K"] < err["Q5_0"] < err["Q4_0"] < err["Q2_K"]
    assert err["Q4_K"] < err["Q4_0"] and err["IQ4_NL"] < err["Q4_0"]  # same 4.5 bits per weight
    assert err["Q4_K"] < err["Q2_K"] / 5


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "IQ4_NL", "Q3_K"])
def test_imatrix_protects_the_columns_it_weights(name):
    w = weights(rows=256, cols=512, seed=3)
    hot = np.zeros(512, np.float32)
    hot[::37] = 1.0  # 14 columns that matter, spread over the blocks
    imatrix = np.where(hot > 0, 100.0, 0.01).astype(np.float32)
    plain = quantization_error(w, name)
    weighted = quantization_error(w, name, imatrix)
    assert plain[0] == weighted[0]
    # the error that counts, on the hot columns, falls a lot; the rest pay for it
    hot_plain = np.sum(np.square(w - dequantize(quantize_rows(w, name), name, w.shape))[:, hot > 0])
    hot_weighted = np.sum(np.square(w - dequantize(quantize_rows(w, name, imatrix), name, w.shape))[:, hot > 0])
    assert hot_weighted < 0.5 * hot_plain
    assert weighted[1] < 0.5 * quantization_error_weighted_by(w, name, imatrix)


def quantization_error_weighted_by(w, name, imatrix):
    """The imatrix-weighted error of the plain (no imatrix) quantisation."""
    sq = np.square(w.astype(np.float64) - dequantize(quantize_rows(w, name), name, w.shape))
    return float(sq.sum(axis=0) @ imatrix.astype(np.float64))


def test_q8_0_ignores_the_imatrix():
    w = weights()
    assert np.array_equal(quantize_rows(w, "Q8_0", np.arange(512, dtype=np.float32)), quantize_rows(w, "Q8_0"))


def test_large_tensor_is_processed_in_row_blocks(monkeypatch):
    import edgelora.ggml_quant as gq

    w = weights(rows=100, cols=256, seed=4)
    whole = quantization_error(w, "Q4_K")
    monkeypatch.setattr(gq, "_CHUNK", 256 * 7)  # 7 rows at a time, the last block short
    assert quantization_error(w, "Q4_K") == (whole[0], pytest.approx(whole[1], rel=1e-12))


def test_fits():
    assert fits("Q8_0", 32) and fits("q4_k", 512) and fits("F16", 7)
    assert not fits("Q4_K", 576 + 32) and not fits("Q4_0", 48)


def test_bad_inputs_are_one_line_errors():
    w = weights(rows=4, cols=96)
    with pytest.raises(EdgeloraError, match=r"Q4_K.*96"):
        quantize_rows(w, "Q4_K")
    with pytest.raises(EdgeloraError, match=r"Q4_K.*96"):
        quantization_error(w, "Q4_K")
    with pytest.raises(EdgeloraError, match="unknown quantisation type 'Q3_X'"):
        quantize_rows(w, "Q3_X")
    with pytest.raises(EdgeloraError, match="unknown quantisation type"):
        quantize_rows(w, "Q8_K")  # a ggml type, but one ggml_quantize_chunk would abort on
    with pytest.raises(EdgeloraError, match="96 finite values"):
        quantize_rows(w, "Q4_0", np.ones(95, np.float32))
    bad = np.ones(96, np.float32)
    bad[3] = np.nan
    with pytest.raises(EdgeloraError, match="importance vector"):
        quantize_rows(w, "Q4_0", bad)
    with pytest.raises(EdgeloraError, match="importance vector"):
        quantize_rows(w, "Q4_0", -np.ones(96, np.float32))
    with pytest.raises(EdgeloraError, match="NaN"):
        quantize_rows(np.full((2, 32), np.nan, np.float32), "Q8_0")
    with pytest.raises(EdgeloraError, match="2-D"):
        quantize_rows(np.ones(32, np.float32), "Q8_0")
    with pytest.raises(EdgeloraError, match="bytes"):
        dequantize(np.zeros(10, np.uint8), "Q8_0", (1, 32))
    with pytest.raises(EdgeloraError) as e:
        quantize_rows(w, "Q4_K")
    assert "\n" not in str(e.value)


def test_types_that_require_an_imatrix():
    w = weights(rows=2, cols=256)
    with pytest.raises(EdgeloraError, match="IQ2_XXS needs an importance matrix"):
        quantize_rows(w, "IQ2_XXS")
    size, err = quantization_error(w, "IQ2_XXS", np.ones(256, np.float32))
    assert size == 2 * 66 and 0 < err < np.sum(np.square(w.astype(np.float64)))
