"""`python -m pipeline <command> [options]`: run one DVC stage or one tool, with a readable log.

dvc.yaml runs every stage this way, and so can a user. A command is the name of a module with a
`main(argv)` in `pipeline.stages`, `pipeline.generators` or `pipeline.tools`, looked up in that order
(`train` is `pipeline.stages.train`, `demo` is `pipeline.generators.demo`, `ui` is `pipeline.tools.ui`), so
adding a stage never edits this file. Before the command's module is imported (and with it TensorFlow),
TensorFlow's native start-up chatter is routed through `pipeline.core.native_logs`, so the log shows the
progress bars, the stage's own summary and real warnings. `python -m pipeline --help` lists the commands.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from pipeline.core.native_logs import filter_stderr

LAYERS = ("stages", "generators", "tools")


def commands() -> dict[str, str]:
    """Every command and its module, read from the source (nothing is imported to list them)."""
    found: dict[str, str] = {}
    for layer in LAYERS:
        for path in sorted((Path(__file__).parent / layer).glob("*.py")):
            if not path.name.startswith("_") and "\ndef main(" in path.read_text():
                found.setdefault(path.stem, f"pipeline.{layer}.{path.stem}")
    return found


def usage() -> str:
    found = commands()
    width = max(map(len, found))
    lines = [f"  {name:<{width}}  {module}" for name, module in found.items()]
    return "usage: python -m pipeline <command> [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    module = commands().get(name)
    if module is None:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    filter_stderr()
    sys.argv = [f"python -m pipeline {name}", *rest]
    result = importlib.import_module(module).main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
