import pytest
import yaml

from edgelora.config import TrainConfig, load_config, save_config
from edgelora.errors import EdgeloraError


def test_precedence_defaults_yaml_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rank: 16\nlr: 0.001\nseq-len: 128\ntargets: attn\n")
    cfg = load_config(str(f), {"rank": 4, "lr": None, "batch_size": None})
    assert cfg.rank == 4  # CLI beats YAML
    assert cfg.lr == 0.001 and cfg.seq_len == 128 and cfg.targets == "attn"  # YAML beats defaults
    assert cfg.batch_size == TrainConfig().batch_size  # untouched default
    assert cfg.alpha == 8.0  # derived: 2 x rank, after overrides


def test_explicit_alpha_kept_and_roundtrip(tmp_path):
    cfg = load_config(None, {"rank": 4, "alpha": 5.0})
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(str(tmp_path / "out.yaml"), {})
    assert again == cfg and again.alpha == 5.0
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["rank"] == 4


@pytest.mark.parametrize("text, message", [
    ("rnak: 3\n", "c.yaml: unknown key 'rnak'"),
    ("rank: [\n", "c.yaml:2: invalid YAML"),
    ("- 1\n- 2\n", "c.yaml: a config must be a mapping"),
    ("rank: 0\n", "invalid config: rank must be >= 1"),
    ("method: full\n", "invalid config: method must be auto, qlora or lora"),
])
def test_bad_config(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(EdgeloraError) as e:
        load_config(str(f), {})
    assert message in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(EdgeloraError, match="nope.yaml: config file not found"):
        load_config(str(tmp_path / "nope.yaml"), {})
