"""Ready parameter sets (issue 7): configs/*.yaml merge into params.yaml and validate; apply is atomic and
refuses invalid overlays naming the field; the `dvc exp run -S` list round-trips."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from pipeline import configs
from pipeline.params import check_all

ROOT = Path(__file__).resolve().parents[1]
DVC = ROOT / "dvc.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture
def params(tmp_path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    return p


def test_the_three_real_data_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"mnist", "cifar10", "celeba64"}


@pytest.mark.parametrize("overlay", CONFIGS, ids=lambda p: p.stem)
def test_config_merges_into_params_and_validates(overlay, params):
    before = params.read_text()
    changes = configs.apply(overlay, params, DVC, dry_run=True)
    assert changes and params.read_text() == before  # dry run writes nothing
    configs.apply(overlay, params, DVC)
    assert check_all(params, DVC) == []
    merged = yaml.safe_load(params.read_text())
    ov = yaml.safe_load(overlay.read_text())
    assert merged == configs.deep_merge(yaml.safe_load(before), ov)
    for key, value in configs.flatten(ov).items():  # every overlay value landed, with its type
        node = merged
        for part in key.split("."):
            node = node[part]
        assert node == value and type(node) is type(value), key
    # comments of params.yaml are kept (ruamel.yaml round trip)
    assert before.splitlines()[0] in params.read_text()


def test_anchor_hyperparameters():
    cifar = yaml.safe_load((ROOT / "configs" / "cifar10.yaml").read_text())
    n = cifar["noise"]
    assert (n["sigma_begin"], n["sigma_end"], n["num_levels"]) == (1.0, 0.01, 10)
    assert (n["ve"]["sigma_min"], n["ve"]["sigma_max"]) == (0.01, 50.0)
    assert (n["vp"]["beta_min"], n["vp"]["beta_max"]) == (0.1, 20.0)
    s = cifar["sample"]
    assert s["ncsn"]["n_steps_each"] == 100 and s["ve"]["snr"] == 0.16
    assert (s["ve"]["predictor"], s["ve"]["corrector"]) == ("reverse_diffusion", "langevin")
    assert (s["vp"]["predictor"], s["vp"]["corrector"]) == ("euler_maruyama", "none")
    t = cifar["train"]
    assert t["ve"]["lr"] == 2e-4 and t["ve"]["warmup"] == 5000 and t["ve"]["batch_size"] == 128
    assert t["ve"]["ema_decay"] == 0.9999 and t["vp"]["ema_decay"] == 0.999


def test_apply_refuses_invalid_overlay_naming_field_and_changes_nothing(params, tmp_path):
    before = params.read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  ve:\n    lr: -1.0\n")
    with pytest.raises(configs.ConfigError, match=r"train\.ve\.lr"):
        configs.apply(bad, params, DVC)
    assert params.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "params.yaml"]  # no temp files left
    # a misspelt key is named with a suggestion, also at the top level
    bad.write_text("sample:\n  ve:\n    snrr: 0.2\n")
    with pytest.raises(configs.ConfigError, match=r"sample\.ve\.snrr"):
        configs.apply(bad, params, DVC)
    bad.write_text("trian:\n  device: cpu\n")
    with pytest.raises(configs.ConfigError, match="trian.*did you mean 'train'"):
        configs.apply(bad, params, DVC)
    assert params.read_bytes() == before
    # the CLI exits 2 with the message
    assert configs.main(["apply", str(bad), "--params", str(params), "--dvc", str(DVC)]) == 2


def test_apply_is_atomic_replace(params, tmp_path, monkeypatch):
    """The new file appears by os.replace of a complete temp file in the same folder; a crash while
    writing leaves the old file."""
    overlay = ROOT / "configs" / "mnist.yaml"
    before = params.read_bytes()

    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(configs.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        configs.apply(overlay, params, DVC)
    assert params.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
    monkeypatch.undo()
    inode = params.stat().st_ino
    configs.apply(overlay, params, DVC)
    assert params.stat().st_ino != inode and yaml.safe_load(params.read_text())["prepare"]["dataset"] == "mnist"


@pytest.mark.parametrize("overlay", CONFIGS, ids=lambda p: p.stem)
def test_set_args_round_trip(overlay):
    ov = yaml.safe_load(overlay.read_text())
    args = configs.set_args(ov)
    assert configs.parse_set_args(args) == ov
    for arg in args:  # each value reads back with its type under YAML 1.1 (PyYAML) too
        key, _, text = arg.partition("=")
        node = ov
        for part in key.split("."):
            node = node[part]
        back = yaml.safe_load(text)
        assert back == node and type(back) is type(node), arg
    cmd = configs.dvc_command(ov, name="x")
    words = shlex.split(cmd)
    assert words[:5] == ["dvc", "exp", "run", "-n", "x"]
    assert words[5::2] == ["-S"] * len(args) and words[6::2] == args


def test_format_value_edge_cases():
    for v in (4e-05, 1e-5, 0.0002, 200000, True, None, "auto", [1, 2, 2], "sqlite:///mlflow.db", 1e20):
        assert yaml.safe_load(configs.format_value(v)) == v
    assert configs.format_value(4e-05) == "4.0e-05"
