"""dvc.yaml tells the truth: each stage's deps are exactly the package modules it runs, and it declares what
it reads from params.yaml and from `paths`.

The import closure is computed from the source (`tests/imports.py`): a stage runs `python -m pipeline <name>`,
so its closure is that of the launcher plus its own module. A module missing from the deps means an edit that
`dvc repro` would not rerun; a module listed that the stage does not import reruns it for nothing.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import commands
from tests.imports import ROOT, closure, code_free_inits

#: Sections no output depends on, so no stage lists them as params: where runs are logged (tracking), and
#: where files go (paths), which the deps and outs name themselves.
NOT_INPUTS = {"tracking", "paths"}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    """The module a stage's command runs: `bin/python -m pipeline <command> ...`."""
    cmd = shlex.split(stage["cmd"])
    assert cmd[:3] == ["bin/python", "-m", "pipeline"], f"{stage['cmd']!r}: stages run through the launcher"
    return commands()[cmd[3]]


def declared(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def module_deps(stage: dict) -> set[Path]:
    return {ROOT / d for d in declared(stage["deps"]) if d.startswith("pipeline/")}


def expected_deps(module: str) -> set[Path]:
    return closure("pipeline.__main__", module) - code_free_inits()


@pytest.mark.parametrize("name", sorted(stages()))
def test_each_stage_depends_on_exactly_the_modules_it_imports(name):
    stage = stages()[name]
    body = stage.get("do", stage)
    expected, listed = expected_deps(stage_module(body)), module_deps(body)
    missing = sorted(str(p.relative_to(ROOT)) for p in expected - listed)
    extra = sorted(str(p.relative_to(ROOT)) for p in listed - expected)
    assert not missing, f"{name}: imports these but dvc.yaml's deps lack them: {missing}"
    assert not extra, f"{name}: dvc.yaml lists these but the stage never imports them: {extra}"


def test_the_check_fails_on_a_planted_missing_dep():
    """Dropping one module from a stage's deps is caught (the test above is not vacuous)."""
    stage = stages()["train"]["do"]
    planted = {**stage, "deps": [d for d in stage["deps"] if d != "pipeline/core/augmentation.py"]}
    missing = expected_deps(stage_module(planted)) - module_deps(planted)
    assert missing == {ROOT / "pipeline/core/augmentation.py"}


def test_package_inits_hold_no_code():
    """Every `__init__.py` is a docstring only, which is why the deps may leave them out."""
    inits = set(ROOT.joinpath("pipeline").rglob("__init__.py"))
    assert inits and inits == code_free_inits()


def _input_of(stage: dict) -> str | None:
    """The `--input` a stage's command passes (the train stage trains on frames or on crops)."""
    cmd = shlex.split(stage["cmd"])
    return cmd[cmd.index("--input") + 1] if "--input" in cmd else None


def _settings_of(stage: dict):
    module = importlib.import_module(stage_module(stage))
    return getattr(module, "SETTINGS", {}).get(_input_of(stage) or "frames", module.Settings)


def _other_inputs_paths(stage: dict) -> set[str]:
    """The paths a module touches only for inputs other than this stage's (`PATHS_BY_INPUT`)."""
    module = importlib.import_module(stage_module(stage))
    by_input = getattr(module, "PATHS_BY_INPUT", {})
    mine = _input_of(stage) or "frames"
    return {p for name, paths in by_input.items() if name != mine for p in paths} - set(by_input.get(mine, ()))


@pytest.mark.parametrize("name", sorted(stages()))
def test_each_stage_lists_every_section_it_reads_as_params(name):
    """Every section a stage's Settings reads (but paths and tracking) is in its params, fully or in part;
    and every param it lists is something it reads."""
    stage = stages()[name]
    body = stage.get("do", stage)
    reads = {f.name for f in dataclasses.fields(_settings_of(body))} - NOT_INPUTS
    params = {p.split(".")[0] for p in declared(body.get("params", []))}
    assert reads <= params, f"{name} reads {sorted(reads - params)} but dvc.yaml's params lack them"
    assert params <= reads, f"{name} lists {sorted(params - reads)} but its Settings never read them"


def _paths_read(module: str) -> set[str]:
    """Every `<...>.paths.<name>` (and `paths.<name>` on a local called paths) the module's source reads."""
    path = Path(importlib.import_module(module).__file__)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            inner = node.value
            if (isinstance(inner, ast.Attribute) and inner.attr == "paths") or (
                isinstance(inner, ast.Name) and inner.id == "paths"
            ):
                found.add(node.attr)
    return found


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_path_a_stage_reads_or_writes_is_a_dep_or_an_out(name):
    stage = stages()[name]
    body = stage.get("do", stage)
    text = yaml.safe_dump({k: body.get(k, []) for k in ("deps", "outs", "metrics", "plots")})
    named = set(re.findall(r"\$\{paths\.(\w+)\}", text))
    unnamed = sorted(_paths_read(stage_module(body)) - named - _other_inputs_paths(body))
    assert not unnamed, f"{name} uses paths {unnamed} that its deps and outs do not name"
