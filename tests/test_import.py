"""`import pearl_edu` loads the engine only; the teaching helpers load on first use."""

from __future__ import annotations

import json
import subprocess
import sys

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
