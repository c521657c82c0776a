"""Every command the README shows works as shown, pasted into a fresh shell in a clone of the project.

"Shows" means the fenced `bash` and `python` blocks, and the inline `make ...` / `.venv/bin/...` commands of
the prose. Each bash block is pasted whole into a new shell (no venv activated unless the block activates it),
in the order the README gives, in the shared tiny clone (`demo_project`, built by `make repro` in a fresh
shell); its lines listed in `ELSEWHERE` (with the test that runs them or the reason they cannot run here) or
in `SERVERS` (run apart, asked for their health, stopped with Ctrl-C) are left out of the paste. A command added
to the README that is not run here and not listed fails `test_every_command_is_exercised`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.factories import ROOT
from tests.projects import fresh_env, in_a_terminal, run

README = ROOT / "README.md"

#: Commands run by other tests, or not runnable here, and where or why.
ELSEWHERE: dict[str, str] = {
    "make repro": "conftest.py::demo_project runs it in a fresh shell; the smoke tests check what it wrote",
    "make test": "CI runs it on a clean clone (.ci/run); a test cannot run the suite it belongs to",
    ".venv/bin/dvc repro": "test_kaggle_smoke.py (the Kaggle download) and test_pipeline_smoke.py (the reruns) run it "
    "from a fresh shell",
    "make test-fast": "the same suite without the slow tests; CI runs the whole of it",
    "make download": "test_ingest.py::test_download_without_credentials_says_what_to_do runs the same program "
    "(it needs a Kaggle account to do more)",
    "make bench": "minutes of timing on an idle machine; bench/ is run by hand, its figures are in the README",
    "make tables": "test_make_tables_rewrites_only_the_tables_from_the_clones_reports runs it in the clone",
    ".venv/bin/pip install -e '.[gpu]'": "installs gigabytes of CUDA wheels, for machines with a GPU",
    "make team-server": "test_team_server.py runs it in a fresh shell in a clone (its TEAM_DIR under /tmp, where "
    "PostgreSQL's own user can reach it), tracks stages into it and stops it with Ctrl-C",
    "make postgres": "`make test` runs it before the suite (test_team_server.py needs what it installs)",
}
#: The two machines' blocks of "Training on several machines" wait for each other, so one shell cannot run them
#: one after the other: tests/test_multiworker.py runs both at once, on two local ports.
_MACHINES = "tests/test_multiworker.py runs both machines' blocks at once, on 127.0.0.1"
_CLUSTER = '{"cluster": {"worker": ["192.0.2.10:2222", "192.0.2.11:2222"]}, "task": {"type": "worker", "index": %d}}'
ELSEWHERE.update({f"export TF_CONFIG='{_CLUSTER % i}'": _MACHINES for i in (0, 1)})
ELSEWHERE[".venv/bin/python -m pipeline train --backbone vgg16"] = _MACHINES
#: Commands that start a server: run, asked for /health on their port, then stopped with Ctrl-C.
SERVERS: dict[str, int] = {
    "make ui": 5000,
    ".venv/bin/python -m pipeline ui --port 5050": 5050,
}


def fenced(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def block_commands(block: str) -> list[str]:
    """A bash block's commands, comments dropped."""
    out = []
    for line in block.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command and not command.startswith("#"):
            out.append(command)
    return out


def bash_commands() -> list[str]:
    """The README's shell commands in order: every command of its bash blocks."""
    return [c for block in fenced("bash") for c in block_commands(block)]


def scripts() -> list[str]:
    """What is pasted here: each bash block without the commands run elsewhere, one script per block."""
    out = []
    for block in fenced("bash"):
        kept = [c for c in block_commands(block) if c not in ELSEWHERE and c not in SERVERS]
        if kept:
            out.append("set -e\n" + "\n".join(kept) + "\n")
    return out


def inline_commands() -> list[str]:
    return re.findall(r"`((?:make [a-z][\w-]*|\.venv/bin/[^`]+))`", README.read_text())


def test_every_command_is_exercised():
    shown = set(bash_commands()) | set(inline_commands())
    unexercised = sorted(shown - set(ELSEWHERE) - set(SERVERS) - set(_run_here()))
    assert not unexercised, f"README commands no test runs: {unexercised}"
    stale = sorted((set(ELSEWHERE) | set(SERVERS)) - shown)
    assert not stale, f"listed here but no longer in the README: {stale}"


def _run_here() -> list[str]:
    return [c for c in bash_commands() if c not in ELSEWHERE and c not in SERVERS]


@pytest.mark.slow
def test_the_readmes_commands_work_in_a_fresh_shell(demo_project):
    """Each block pasted into a new shell: two queued experiments run at once, their table, their plots."""
    work, _ = demo_project
    # Traced with the shell's clock, so a block that stalls says on which command (about 4 min here, idle).
    traced = (f"PS4='+ [${{SECONDS}} s] '\nset -x\n{script}" for script in scripts())
    outputs = "".join(run(script, work, fresh_env(work), timeout=900) for script in traced)
    shown = outputs[outputs.index("Experiment"):] if "Experiment" in outputs else outputs
    for name in ("resnet-128", "random-folds"):
        assert name in shown, f"experiment {name} missing from dvc exp show:\n{shown}"
    assert (work / "dvc_plots" / "index.html").is_file()
    params = (work / "params.yaml").read_text()
    assert "image_size: 128" in params  # `dvc exp apply resnet-128` brought its params back
    # Each queued experiment ran from the baseline plus its own -S only: random-folds kept 32 px images.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")  # the clone's own store, as its stages found it
    runs = client.search_runs([client.get_experiment_by_name("fisheries").experiment_id], max_results=500)
    names = {r.data.tags.get("dvc_exp_name") for r in runs}
    assert {"resnet-128", "random-folds"} <= names  # every experiment's runs land in the store
    by_exp = {n: [r for r in runs if r.data.tags.get("dvc_exp_name") == n] for n in ("resnet-128", "random-folds")}
    assert {r.info.run_name for r in by_exp["resnet-128"]} >= {"resnet50 @ resnet-128", "ensemble @ resnet-128"}
    assert all(r.info.status == "FINISHED" for rs in by_exp.values() for r in rs)
    # `dvc queue start -j 2`: the two experiments ran at the same time (their runs' spans overlap).
    spans = [(min(r.info.start_time for r in rs), max(r.info.end_time for r in rs)) for rs in by_exp.values()]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], f"the experiments ran one after the other: {spans}"
    # The train runs (frames and crops): the localise run logs cv.* too, but no image size.
    leaky = [r for r in runs if r.data.tags.get("dvc_exp_name") == "random-folds"
             and r.data.tags.get("stage") == "train" and r.data.params.get("cv.group_by")]
    assert leaky and all(r.data.params["cv.group_by"] == "none" and r.data.params["model.image_size"] == "32"
                         for r in leaky)


@pytest.mark.slow
def test_the_readmes_python_example_loads_the_champion_and_predicts(demo_project):
    work, _ = demo_project
    (snippet,) = [b for b in fenced("python") if "models:/" in b]
    out = run([str(work / ".venv" / "bin" / "python"), "-c", snippet], work, fresh_env(work), timeout=600)
    header = next(line for line in out.splitlines() if "ALB" in line)
    assert header.split() == ["ALB", "BET", "DOL", "LAG", "NoF", "OTHER", "SHARK", "YFT"]


@pytest.mark.slow
def test_make_tables_rewrites_only_the_tables_from_the_clones_reports(demo_project):
    """`make tables` as a user types it: the README's tables become what this clone's reports say."""
    from pipeline.tools import readme_tables

    work, _ = demo_project
    before = (work / "README.md").read_text()
    run("make tables", work, fresh_env(work), timeout=900)
    after = (work / "README.md").read_text()
    assert after == readme_tables.fill(before, readme_tables.render(work / "reports"))
    outside = re.compile(r"<!-- table:(\w+) -->.*?<!-- /table:\1 -->", re.S)
    assert outside.sub("", after) == outside.sub("", before)  # prose and commands untouched


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(SERVERS))
def test_the_readmes_servers_answer_and_stop_on_ctrl_c(demo_project, command):
    work, _ = demo_project
    port = SERVERS[command]
    server = subprocess.Popen(in_a_terminal(command), cwd=work, env=fresh_env(work), start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert server.poll() is None, f"{command} exited: {server.stdout.read()[-2000:]}"
                assert time.monotonic() < deadline, f"{command} did not answer on port {port}"
                time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in that terminal, as the README says
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            pytest.fail(f"{command} did not stop on Ctrl-C")
