"""`import pearl_edu` loads the engine only; the teaching helpers load on first use.

And the modules of pearl_edu import one another one way: no import cycle on load.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pearl_edu

# What only the teaching helpers (pearl_edu.teaching) need, and the helpers themselves.
TEACHING_ONLY = ("matplotlib", "transformers", "pearl_edu.teaching")


def _modules_after(code: str) -> list[str]:
    """The names of TEACHING_ONLY found in sys.modules after running ``code`` afresh."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps([m for m in {TEACHING_ONLY!r} if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_import_pearl_edu_loads_no_teaching_helper_nor_their_dependencies():
    assert _modules_after("import pearl_edu") == []


def test_the_command_line_loads_no_teaching_helper():
    assert _modules_after("import pearl_edu.cli, pearl_edu.__main__") == []


def test_engine_names_need_no_teaching_helper():
    names = ", ".join(pearl_edu.__all__)
    assert _modules_after(f"from pearl_edu import {names}") == []


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("setup", "notebook"),
        ("leaderboard", "seed"),
        ("make_tiny_model", "toy"),
        ("MiniPearl", "minipearl"),
        ("MiniPearlSettings", "minipearl"),
        ("build_mini_pearl", "minipearl"),
        ("PreflightError", "preflight"),
        ("Requirements", "preflight"),
        ("Resources", "preflight"),
        ("measure_resources", "preflight"),
    ],
)
def test_teaching_names_resolve_on_first_use(name, module):
    teaching = __import__(f"pearl_edu.teaching.{module}", fromlist=[name])
    assert getattr(pearl_edu, name) is getattr(teaching, name)
    assert name in dir(pearl_edu)


@pytest.mark.parametrize(
    "module", ["connectivity", "fullrun", "minipearl", "notebook", "preflight", "seed", "toy"]
)
def test_old_module_names_still_reach_the_teaching_modules(module):
    """``from pearl_edu import minipearl``, from before `pearl_edu.teaching`, still works."""
    namespace: dict = {}
    exec(f"from pearl_edu import {module}", namespace)
    assert namespace[module] is sys.modules[f"pearl_edu.teaching.{module}"]


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        pearl_edu.no_such_name  # noqa: B018


PACKAGE = Path(pearl_edu.__file__).parent


def _imports_on_load(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it loads: not those in functions or under TYPE_CHECKING."""
    found, blocks = [], [tree.body]
    while blocks:
        for node in blocks.pop():
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.Try):
                blocks += [node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)]
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                blocks += [node.body, node.orelse]
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of pearl_edu it imports on load (``from P import M``: P.M)."""
    paths = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        names = set()
        for node in _imports_on_load(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif node.module and not node.level:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    names.add(submodule if submodule in paths else node.module)
        graph[name] = {n for n in names if n in paths and n != name}
    return graph


def test_no_import_cycle_inside_the_package():
    graph = _import_graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = " -> ".join(path[path.index(module) :] + [module])
            pytest.fail(f"import cycle: {cycle}")
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_no_function_shadows_a_module_of_the_same_name():
    """`pearl_edu.merge`, `plan`, `verify` and `core.slerp` are functions, and no module
    of the same name exists beside them, so importing a module never rebinds a name."""
    root = Path(pearl_edu.__file__).parent
    for package, folder in ((pearl_edu, root), (pearl_edu.core, root / "core")):
        modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"} | {
            p.name for p in folder.iterdir() if (p / "__init__.py").is_file()
        }
        for name in modules:
            value = getattr(package, name, None)
            assert value is None or isinstance(value, type(pearl_edu)), (
                f"{package.__name__}.{name} is {type(value).__name__}, and a module too"
            )


def test_the_package_says_it_is_typed():
    """PEP 561: `py.typed` ships with the package, so type checkers read its annotations."""
    root = Path(pearl_edu.__file__).parent
    assert (root / "py.typed").is_file()
    pyproject = (root.parent / "pyproject.toml").read_text(encoding="utf-8")
    shipped = re.search(r"\[tool\.setuptools\.package-data\]\npearl_edu = \[(.*?)\]", pyproject)
    assert shipped and '"py.typed"' in shipped.group(1)
