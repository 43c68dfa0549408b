"""converters/ and quant_presets/ install under the edgelora namespace, never as top-level modules."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import importlib.util, json, edgelora.converters as c, edgelora.quant_presets as q; "
         "from edgelora.demo import demo_data; "
         "print(json.dumps({'converters': c.__file__, 'presets': q.names(), 'demo': str(demo_data()[0]), "
         "'top_converters': importlib.util.find_spec('converters') is not None, "
         "'top_presets': importlib.util.find_spec('quant_presets') is not None}))")


def _probe(cwd, env=None):
    import json
    import os

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    return next(out.glob("edgelora-*.whl"))


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgelora/converters/__init__.py" in names
    assert {"edgelora/bench/__init__.py", "edgelora/bench/torch_row.py", "edgelora/bench/report.py"} <= set(names)
    assert "edgelora/quant_presets/q4_k_m.yaml" in names
    assert {"edgelora/demo_data/extract_train.jsonl", "edgelora/demo_data/extract_eval.jsonl",
            "edgelora/demo_data/LICENSE"} <= set(names)  # `edgelora demo` works from a plain install
    tops = {n.split("/")[0] for n in names}
    assert tops == {"edgelora", wheel.name.split("-py3")[0] + ".dist-info"}, tops


def test_normal_install(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert not (target / "converters").exists() and not (target / "quant_presets").exists()
    got = _probe(tmp_path, {"PYTHONPATH": str(target)})
    assert Path(got["converters"]).parent == target / "edgelora" / "converters"
    assert Path(got["demo"]) == target / "edgelora" / "demo_data" / "extract_train.jsonl"
    assert got["presets"] == ["f16", "q2_k", "q4_k_m", "q8_0"]
    assert not got["top_converters"] and not got["top_presets"]


def test_editable_install_of_this_checkout(tmp_path):
    """The test environment is an editable install (.ci/setup): edgelora.converters is this repo's converters/."""
    got = _probe(tmp_path)
    assert Path(got["converters"]).resolve().parent == ROOT / "converters"
    assert Path(got["demo"]).resolve() == ROOT / "examples" / "data" / "extract_train.jsonl"
    assert got["presets"] == ["f16", "q2_k", "q4_k_m", "q8_0"]
    assert not got["top_converters"] and not got["top_presets"]
