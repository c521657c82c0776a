"""params.yaml is validated once, loudly: typos and bad values fail at start-up with the valid choices."""

import dataclasses
import importlib
import shutil
import typing

import pytest
import yaml

from pipeline.__main__ import commands
from pipeline.core import params
from pipeline.core.params import ConfigError, Cv, Model, Paths, Train, load
from tests.factories import ROOT


@dataclasses.dataclass(frozen=True)
class Reads:
    """A stage's Settings in miniature."""

    seed: int
    cv: Cv
    train: Train


@dataclasses.dataclass(frozen=True)
class _LocaliseReads:
    localise: params.Localise


@pytest.fixture
def path(tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    return target


def _edit(path, fn):
    raw = yaml.safe_load(path.read_text())
    fn(raw)
    path.write_text(yaml.safe_dump(raw))


def _modules_with_settings():
    for module in commands().values():
        mod = importlib.import_module(module)
        if hasattr(mod, "Settings"):
            yield mod


def test_every_stage_and_tool_loads_its_settings_from_the_repository_params():
    loaded = {mod.__name__: load(mod.Settings, ROOT / "params.yaml") for mod in _modules_with_settings()}
    assert {"pipeline.stages.train", "pipeline.stages.mnist", "pipeline.generators.demo"} <= set(loaded)
    train = loaded["pipeline.stages.train"]
    assert isinstance(train.model, Model) and isinstance(train.model.backbones, tuple) and train.cv.n_folds >= 2


def test_every_settings_field_is_a_typed_section():
    for mod in _modules_with_settings():
        hints = typing.get_type_hints(mod.Settings)
        for field in dataclasses.fields(mod.Settings):
            assert hints[field.name] is params.SECTIONS[field.name], f"{mod.__name__}.Settings.{field.name}"


def test_unknown_key_lists_valid_keys(path):
    _edit(path, lambda r: r["train"].update(epocs=3))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epocs'\].*epochs"):
        load(Reads, path)


def test_unknown_section_fails_every_stage(path):
    _edit(path, lambda r: r.update(esemble={"method": "mean"}))
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['esemble'\].*'ensemble'"):
        load(Reads, path)


def test_missing_key_is_named(path):
    _edit(path, lambda r: r["cv"].pop("n_folds"))
    with pytest.raises(ConfigError, match="cv: missing key 'n_folds'"):
        load(Reads, path)


def test_bad_choice_lists_choices(path):
    _edit(path, lambda r: r["cv"].update(group_by="camera"))
    with pytest.raises(ConfigError, match=r"'camera' is not one of \['boat', 'none'\]"):
        load(Reads, path)


def test_wrong_type_is_named(path):
    _edit(path, lambda r: r["train"].update(epochs="ten"))
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load(Reads, path)


@pytest.mark.parametrize("value", [2, "auto"])
def test_a_setting_of_either_kind_takes_either(path, value):
    _edit(path, lambda r: r["localise"].update(processes=value))
    assert load(_LocaliseReads, path).localise.processes == value


def test_a_setting_of_either_kind_names_both_when_it_is_neither(path):
    _edit(path, lambda r: r["localise"].update(processes="many"))
    both = r"localise.processes: expected an integer.* or 'many' is not one of \['auto'\]"
    with pytest.raises(ConfigError, match=both):
        load(_LocaliseReads, path)


@pytest.mark.parametrize("seed", ["42", 4.2, True, None])
def test_the_seed_is_validated_too(path, seed):
    _edit(path, lambda r: r.update(seed=seed))
    with pytest.raises(ConfigError, match="seed: expected an integer"):
        load(Reads, path)


def test_a_stage_reads_only_its_sections(path):
    _edit(path, lambda r: r["ensemble"].update(method="voodoo"))
    assert load(Reads, path).cv.n_folds >= 2  # a broken section another stage reads does not stop this one


def test_settings_with_a_field_that_is_no_section_is_a_bug_not_a_config_error(path):
    @dataclasses.dataclass(frozen=True)
    class Wrong:
        paths: Cv  # the section `paths` is typed Paths

    with pytest.raises(TypeError, match="Wrong.paths must be a section of params.yaml typed Paths"):
        load(Wrong, path)
    assert params.SECTIONS["paths"] is Paths


def test_flatten_gives_dotted_keys():
    flat = params.flatten({"model": {"head": {"units": 8}, "backbones": ("a", "b")}})
    assert flat == {"model.head.units": 8, "model.backbones": ["a", "b"]}
