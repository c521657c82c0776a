"""params.yaml is validated once, loudly: typos and bad values fail at start-up with the valid choices."""

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def _edit(path, fn):
    raw = yaml.safe_load(path.read_text())
    fn(raw)
    path.write_text(yaml.safe_dump(raw))


def test_repository_params_validate():
    cfg = config.load(ROOT / "params.yaml")
    assert cfg.model.backbones and cfg.cv.n_folds >= 2
    assert isinstance(cfg.model.backbones, tuple)


def test_unknown_key_lists_valid_keys(params):
    _edit(params, lambda r: r["train"].update(epocs=3))
    with pytest.raises(config.ConfigError, match=r"unknown key\(s\) \['epocs'\].*epochs"):
        config.load(params)


def test_missing_key_is_named(params):
    _edit(params, lambda r: r["cv"].pop("n_folds"))
    with pytest.raises(config.ConfigError, match="cv: missing key 'n_folds'"):
        config.load(params)


def test_bad_choice_lists_choices(params):
    _edit(params, lambda r: r["cv"].update(group_by="camera"))
    with pytest.raises(config.ConfigError, match=r"'camera' is not one of \['boat', 'none'\]"):
        config.load(params)


def test_wrong_type_is_named(params):
    _edit(params, lambda r: r["train"].update(epochs="ten"))
    with pytest.raises(config.ConfigError, match="train.epochs: expected an integer"):
        config.load(params)


def test_section_loads_alone(params):
    model = config.load_section("model", path=params)
    assert isinstance(model, config.Model) and isinstance(model.head, config.Head)


def test_flatten_gives_dotted_keys():
    flat = config.flatten({"model": {"head": {"units": 8}, "backbones": ("a", "b")}})
    assert flat == {"model.head.units": 8, "model.backbones": ["a", "b"]}
