"""edgelora.gguf_header: the header reader the export and the runtime use in place of gguf-py's
GGUFReader must read every file as GGUFReader does, skip only long arrays, and refuse a damaged
header or tensor table in one line."""
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgelora.errors import EdgeloraError
from edgelora.gguf_header import ARRAY_ITEMS, LongArray, gguf_layout, gguf_metadata


def write_gguf(path: Path, alignment: int = 64) -> Path:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("general.alignment", alignment)
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_float32("edgelora.figure", 0.25)
    w.add_array("general.tags", ["a", "b", "ü"])
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(ARRAY_ITEMS + 5)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(ARRAY_ITEMS + 1)])
    w.add_array("llama.per_layer", [1, 2, 3])
    w.add_tensor("a.weight", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((2, 96)).astype(np.float16))
    q8 = rng.integers(0, 255, (4, 2 * 34), dtype=np.uint8)  # 4 rows of 64 values: 2 Q8_0 blocks of 34 bytes
    w.add_tensor("c.weight", q8, raw_shape=(4, 68), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_layout_reads_what_gguf_py_reads(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    layout, reader = gguf_layout(path), gguf.GGUFReader(path)
    assert [t.name for t in layout.tensors] == [t.name for t in reader.tensors] == ["a.weight", "b.weight", "c.weight"]
    for ours, theirs in zip(layout.tensors, reader.tensors):
        assert ours.shape == tuple(int(d) for d in theirs.shape)
        assert (ours.tensor_type, ours.n_elements, ours.n_bytes, ours.data_offset) == \
            (theirs.tensor_type, int(theirs.n_elements), int(theirs.n_bytes), int(theirs.data_offset))
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        assert np.array_equal(ours.data, theirs.data)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        ours, theirs = layout.fields[key], field.contents()
        if len(theirs if isinstance(theirs, list) else []) > ARRAY_ITEMS:
            assert isinstance(ours, LongArray) and len(ours) == len(theirs), key
        else:
            assert ours == pytest.approx(theirs) if isinstance(theirs, float) else ours == theirs, key
    assert layout.fields["general.tags"] == ["a", "b", "ü"] and layout.fields["llama.per_layer"] == [1, 2, 3]
    assert gguf_metadata(path)["llama.context_length"] == 128


def test_real_exported_files_read_alike(tiny_export):
    for path in (tiny_export["merged:f16"], tiny_export["lora"]):
        layout, reader = gguf_layout(path), gguf.GGUFReader(path)
        assert [(t.name, t.data_offset, t.n_bytes) for t in layout.tensors] == \
            [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
        assert all(np.array_equal(a.data, b.data) for a, b in zip(layout.tensors, reader.tensors))


def test_a_cut_off_tensor_is_one_line(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    cut = tmp_path / "cut.gguf"
    last = gguf_layout(path).tensors[-1]
    cut.write_bytes(path.read_bytes()[:last.data_offset + last.n_bytes - 10])
    with pytest.raises(EdgeloraError, match=rf"^{cut}: truncated or corrupt GGUF \(tensor c.weight past the end"):
        gguf_layout(cut)
    assert gguf_metadata(cut)["general.name"] == "tiny"  # the metadata alone is whole


def test_a_hostile_string_length_in_a_long_array_is_one_line(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    at = data.index(b"tok7") - 8  # the length field of the vocabulary's eighth string
    data[at:at + 8] = (2**62).to_bytes(8, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(EdgeloraError, match=rf"^model {bad}: truncated or corrupt GGUF header \(an array "
                                            rf"{ARRAY_ITEMS + 5:,} items long runs past the end"):
        gguf_metadata(bad)
