"""Every backend against the reference, for every merge method.

The reference backend is the core as the book prints it (`pearl_edu.backends.reference`).
On the CPU the CPU backend (what ``auto`` picks there) must give its bits for every method,
tensor by tensor (`merge_tensor`) and for whole merges (`pearl_edu.merge` and
``pearl-edu merge --backend reference``). The device backend, run on CPU tensors, must give
them too wherever it runs the core's code: every method but SLERP, whose sums it takes in
another order (its bound is ``tests/test_contract.py``'s), and with TIES' ties at its cut
broken by position (``--fast-trim``), as it always breaks them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pearl_edu.backends import BY_NAME, Backend, backend_for
from pearl_edu.engine import merge
from pearl_edu.methods import METHODS, merge_tensor
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model
from pearl_edu.ulp import same_bits

# One output tensor's parameters for each method: shared, then one row per input (the
# base first, with an empty row where the method gives the base none).
CASES: dict[str, tuple[dict, list[dict]]] = {
    "slerp": ({"t": 0.3}, [{}, {}]),
    "linear": ({"normalize": 1.0}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
    "passthrough": ({}, [{"scale": 0.5}]),
    "task_arithmetic": ({"lambda": 0.8}, [{}, {"weight": 0.6}, {"weight": 0.4}]),
    "ties": ({}, [{}, {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}]),
    "dare_linear": ({}, [{}, {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}]),
    "dare_ties": ({}, [{}, {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}]),
    "breadcrumbs": ({}, [{}, {"weight": 0.6, "density": 0.6}, {"weight": 0.4, "density": 0.8}]),
    "breadcrumbs_ties": (
        {},
        [{}, {"weight": 0.6, "density": 0.6, "gamma": 0.05}, {"weight": 0.4, "density": 0.8}],
    ),
    "della": ({}, [{}, {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.6}]),
    "della_linear": ({}, [{}, {"weight": 0.6, "density": 0.5}, {"weight": 0.4}]),
    "nuslerp": ({}, [{}, {"weight": 0.6}, {"weight": 0.4}]),
    "multislerp": ({}, [{}, {"weight": 0.6}, {"weight": 0.4}]),
    "karcher": ({}, [{}, {}, {}]),
    "model_stock": ({}, [{}, {}, {}]),
    "sce": ({"select_topk": 0.5}, [{}, {}, {}]),
    "ram": ({}, [{}, {}, {}]),
    "ramplus_tl": ({"r": 0.5}, [{}, {}, {}]),
    "nearswap": ({"t": 0.2}, [{}, {}]),
    "arcee_fusion": ({}, [{}, {}]),
}
# Where the device backend runs its own code rather than the core's.
DEVICE_OWN = {"slerp"}


def test_every_registered_method_has_a_case():
    assert sorted(CASES) == sorted(METHODS)


def inputs(count: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    """A base and siblings of it: close enough for SLERP's angle, far enough to differ."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    siblings = [base + 0.5 * torch.randn(shape, generator=g) for _ in range(count - 1)]
    return [x.to(dtype) for x in [base, *siblings]]


def merged(method: str, tensors, backend: str, *, fast_trim: bool = False, out=None):
    params, rows = CASES[method]
    return merge_tensor(
        method,
        tensors,
        0,
        params,
        input_params=rows,
        seed=1234,
        name="model.layers.0.mlp.up_proj.weight",
        fast_trim=fast_trim,
        backend=backend,
        out=out,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", sorted(CASES))
def test_the_cpu_backend_gives_the_references_bits(method, dtype):
    count = len(CASES[method][1])
    for shape in [(48, 40), (7,), (1100, 1000)]:  # the last: more than one 2^20 chunk
        tensors = inputs(count, shape, dtype, seed=len(shape))
        expected = merged(method, tensors, "reference")
        assert same_bits(merged(method, tensors, "cpu"), expected), (method, shape)
        assert same_bits(merged(method, tensors, "auto"), expected), (method, shape)
        # Into the engine's output buffer, where the method writes into one.
        buffer = torch.empty(shape, dtype=dtype)
        assert same_bits(merged(method, tensors, "cpu", out=buffer), expected), (method, shape)


@pytest.mark.parametrize("method", sorted(set(CASES) - DEVICE_OWN))
def test_the_device_backend_runs_the_cores_code_on_the_cpu(method):
    tensors = inputs(len(CASES[method][1]), (96, 80), torch.bfloat16, seed=5)
    expected = merged(method, tensors, "reference", fast_trim=True)
    assert same_bits(merged(method, tensors, "device"), expected), method


def test_ties_on_the_device_backend_keeps_the_ties_at_its_cut_by_position():
    # Many equal magnitudes at the cut: the two ways of breaking ties keep other entries.
    base = torch.zeros(4096, dtype=torch.bfloat16)
    others = [torch.tensor([1.0, -1.0] * 2048, dtype=torch.bfloat16), base + 0.5]
    by_position = merged("ties", [base, *others], "reference", fast_trim=True)
    assert same_bits(merged("ties", [base, *others], "device"), by_position)
    assert same_bits(merged("ties", [base, *others], "cpu", fast_trim=True), by_position)


def test_every_backend_has_every_operation_of_the_protocol():
    operations = [name for name in vars(Backend) if not name.startswith("_") and name != "name"]
    assert "ties" in operations and "generators" in operations
    for name, backend in BY_NAME.items():
        assert backend.name == name
        for operation in operations:
            assert callable(getattr(backend, operation)), (name, operation)
    assert backend_for("cpu", "reference") is BY_NAME["reference"]
    assert backend_for("cpu") is BY_NAME["cpu"]


def test_the_reference_backend_is_the_core_itself(monkeypatch):
    # What the reference backend runs is the core's function, looked up as the book prints it.
    from pearl_edu import core

    calls = []
    original = core.ties

    def counted(*args, **kwargs):
        calls.append(kwargs.get("stable"))
        return original(*args, **kwargs)

    monkeypatch.setattr("pearl_edu.core.ties", counted)
    from pearl_edu.backends import reference

    monkeypatch.setattr(reference.Reference, "ties", reference._core(counted))
    tensors = inputs(3, (16, 8), torch.float32)
    merged("ties", tensors, "reference")
    assert calls == [False]


# ---------------------------------------------------------------------------------------
# Whole merges: pearl_edu.merge and the command, with --backend reference.

METHOD_YAML = {
    "slerp": "parameters: {t: [0, 0.3, 0.7, 1]}",
    "linear": "parameters: {weight: 0.4}",
    "task_arithmetic": "parameters: {weight: 0.5, lambda: 0.9}",
    "ties": "parameters: {weight: 0.5, density: 0.4}",
    "dare_linear": "parameters: {weight: 0.5, density: 0.6}",
    "dare_ties": "parameters: {weight: 0.5, density: 0.6}",
    "breadcrumbs": "parameters: {weight: 0.5, density: 0.8, gamma: 0.05}",
    "breadcrumbs_ties": "parameters: {weight: 0.5, density: 0.8, gamma: 0.05}",
    "della": "parameters: {weight: 0.5, density: 0.6, epsilon: 0.1}",
    "della_linear": "parameters: {weight: 0.5, density: 0.6, epsilon: 0.1}",
    "nuslerp": "parameters: {weight: 0.5}",
    "multislerp": "parameters: {weight: 0.5}",
    "karcher": "",
    "model_stock": "",
    "sce": "",
    "ram": "",
    "ramplus_tl": "",
    "nearswap": "",
    "arcee_fusion": "",
}
# Methods that take the base and one model, and their shared parameters.
TWO_MODELS = {
    "slerp": "parameters: {t: [0, 0.3, 0.7, 1]}",
    "nearswap": "parameters: {t: 0.2}",
    "arcee_fusion": "",
}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("family")
    base = make_tiny_model(root / "base", num_layers=2, seed=1)
    return [base] + [
        make_tiny_model(root / f"sibling{i}", base=base, noise=0.5, seed=2 + i) for i in range(2)
    ]


def config_text(method: str, models: list[Path]) -> str:
    used = models[:2] if method in TWO_MODELS else models
    if method == "passthrough":
        return f"merge_method: passthrough\nmodels:\n  - model: {models[1]}\ndtype: bfloat16\n"
    lines = [f"merge_method: {method}", f"base_model: {models[0]}", "models:"]
    for path in used:
        lines.append(f"  - model: {path}")
        if path != models[0] and METHOD_YAML[method]:
            lines.append(f"    {METHOD_YAML[method]}")
        elif method == "linear":
            lines.append("    parameters: {weight: 0.2}")
    if TWO_MODELS.get(method):
        lines.append(TWO_MODELS[method])
    lines += ["dtype: bfloat16", "random_seed: 3"]
    return "\n".join(lines) + "\n"


def same_model(a: Path, b: Path) -> None:
    ours, theirs = load_state_dict(a), load_state_dict(b)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert same_bits(ours[name], theirs[name]), name


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_merge_on_the_reference_backend_gives_the_defaults_bits(family, tmp_path, method):
    text = config_text(method, family)
    merge(text, tmp_path / "auto", progress=False)
    merge(text, tmp_path / "reference", backend="reference", progress=False)
    same_model(tmp_path / "auto", tmp_path / "reference")


def test_the_command_takes_backend_reference(family, tmp_path):
    config = tmp_path / "ties.yml"
    config.write_text(config_text("ties", family))
    command = [sys.executable, "-m", "pearl_edu", "merge", "--verbose", str(config)]
    runs = {
        backend: subprocess.run(
            [*command, str(tmp_path / backend), "--backend", backend],
            capture_output=True,
            text=True,
        )
        for backend in ("reference", "auto")
    }
    assert all(run.returncode == 0 for run in runs.values()), runs
    assert "the reference backend (--backend reference)" in runs["reference"].stderr
    assert "--backend" not in runs["auto"].stderr
    same_model(tmp_path / "auto", tmp_path / "reference")
    refused = subprocess.run(
        [*command, str(tmp_path / "x"), "--backend", "exact"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--backend" in refused.stderr
    assert not (tmp_path / "x").exists()
