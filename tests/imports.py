"""Which package modules a stage runs: the static import closure of its module, read from the source.

Used by the DVC graph test (every stage's `deps` must be exactly its closure) and handy by hand:
`python -m tests.imports pipeline.stages.train` prints the files a stage's deps must list.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"


def module_file(name: str) -> Path | None:
    """The file of module `name` (a package's `__init__.py`), or None when it is not a module of ours."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imported_modules(path: Path) -> set[str]:
    """Every `pipeline...` module the file imports, at the top or inside functions, for real (not for typing)."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pipeline.core import tracking` imports a module; `from pipeline.core.x import f` a name.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if module_file(m) is not None}


def closure(*modules: str) -> set[Path]:
    """Every package file that importing `modules` executes, `__init__.py` files of the packages on the way
    included (see `code_free_inits` for why the DVC test may leave those out)."""
    todo = list(modules)
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            todo.append(".".join(parts[:i]))
        path = module_file(name)
        if path is None:
            continue
        files.add(path)
        todo.extend(imported_modules(path))
    return files


def code_free_inits() -> set[Path]:
    """The package `__init__.py` files that hold nothing but a docstring: running them cannot change an
    output, so a stage's deps need not list them."""
    out = set()
    for init in ROOT.joinpath(PACKAGE).rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        if all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body):
            out.add(init)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg)
        for path in sorted(closure(arg) - code_free_inits()):
            print(f"  - {path.relative_to(ROOT)}")
