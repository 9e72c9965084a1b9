"""Planning a merge from headers alone: tensors, inputs, t, filters, layers and errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from pearl_edu.config import load_config
from pearl_edu.errors import ConfigError, ModelError
from pearl_edu.layer_schedule import (
    OTHER,
    gradient_value,
    interpolation_t,
    layer_position,
    schedule,
    slice_scopes,
)
from pearl_edu.tensor_plan import plan

MERGEKIT_ARCHITECTURES = Path(__import__("mergekit").__file__).parent / "_data" / "architectures"
LAYER_TENSORS = {
    "llama": [
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ],
}
LAYER_TENSORS["mistral"] = LAYER_TENSORS["llama"]
LAYER_TENSORS["qwen2"] = LAYER_TENSORS["llama"] + [
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
]


@dataclass
class Meta:
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16


@dataclass
class Header:
    tensors: dict[str, Meta]
    config: dict = field(default_factory=dict)


def make_header(
    arch: str = "mistral",
    num_layers: int = 4,
    *,
    hidden: int = 8,
    vocab: int = 32,
    tied: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> Header:
    """A header with the real tensor names of ``arch`` and tiny shapes."""
    tensors = {"model.embed_tokens.weight": Meta((vocab, hidden), dtype)}
    for i in range(num_layers):
        for rest in LAYER_TENSORS[arch]:
            shape = (hidden,) if rest.endswith(("norm.weight", "bias")) else (hidden, hidden)
            tensors[f"model.layers.{i}.{rest}"] = Meta(shape, dtype)
    tensors["model.norm.weight"] = Meta((hidden,), dtype)
    if not tied:
        tensors["lm_head.weight"] = Meta((vocab, hidden), dtype)
    config = {"num_hidden_layers": num_layers, "tie_word_embeddings": tied}
    return Header(tensors=tensors, config=config)


def slerp_yaml(slices: str, *, base: str = "a", t: str = "0.5", extra: str = "") -> str:
    return (
        f"merge_method: slerp\nbase_model: {base}\nslices:\n{slices}parameters:\n  t: {t}\n{extra}"
    )


def two_model_slice(a: str = "a", b: str = "b", ra=(0, 4), rb=(0, 4), more: str = "") -> str:
    return (
        "  - sources:\n"
        f"      - {{model: {a}, layer_range: [{ra[0]}, {ra[1]}]}}\n"
        f"      - {{model: {b}, layer_range: [{rb[0]}, {rb[1]}]}}\n"
        f"{more}"
    )


PEARL_T = "\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5"


# --- the gradient rule -------------------------------------------------------------------


def test_layer_position():
    assert [layer_position(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert layer_position(0, 1) == 1.0


def test_gradient_value_by_hand():
    values = [0, 0.5, 0.3, 0.7, 1]
    assert gradient_value(values, 0.0) == 0.0
    assert gradient_value(values, 0.25) == 0.5
    assert gradient_value(values, 0.375) == pytest.approx(0.4)
    assert gradient_value(values, 1.0) == 1.0
    assert gradient_value([0.8], 0.3) == 0.8


def test_pearl_schedule_matches_numpy_interp_and_mergekit():
    from mergekit.config import ConditionalParameter, evaluate_setting

    config = load_config("pearl-7b-slerp")
    sched = schedule(config)
    assert sched.columns == {"t": ("self_attn", "mlp", "other")}
    assert [row.layer for row in sched.rows] == list(range(32))

    attn_anchor, mlp_anchor = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
    x = np.arange(32) / 31
    np.testing.assert_allclose(
        sched.column("t", "self_attn"), np.interp(x, np.linspace(0, 1, 5), attn_anchor)
    )
    np.testing.assert_allclose(
        sched.column("t", "mlp"), 1 - np.array(sched.column("t", "self_attn"))
    )
    assert sched.column("t", "other") == [0.5] * 32
    assert sched.column("t", "self_attn")[0] == 0.0 and sched.column("t", "self_attn")[31] == 1.0
    assert sched.column("t", "mlp")[0] == 1.0 and sched.column("t", "mlp")[31] == 0.0
    # Layer 8 sits at x = 8/31, just past the anchor 0.5 at x = 0.25, on the way down to 0.3.
    assert sched.column("t", "self_attn")[8] == pytest.approx(0.5 - 0.2 * (8 / 31 - 0.25) / 0.25)

    # mergekit's own evaluation of the same setting agrees, layer by layer.
    setting = [
        ConditionalParameter(filter="self_attn", value=attn_anchor),
        ConditionalParameter(filter="mlp", value=mlp_anchor),
        ConditionalParameter(value=0.5),
    ]
    for i, row in enumerate(sched.rows):
        for label, name in [
            ("self_attn", f"model.layers.{i}.self_attn.q_proj.weight"),
            ("mlp", f"model.layers.{i}.mlp.up_proj.weight"),
            ("other", f"model.layers.{i}.input_layernorm.weight"),
        ]:
            theirs = evaluate_setting(name, setting, i / 31, validate=float)
            assert row.values["t"][label] == pytest.approx(theirs, abs=1e-12)

    assert sched.outside_layers == {
        "model.embed_tokens.weight": {"t": 0.5},
        "model.norm.weight": {"t": 0.5},
        "lm_head.weight": {"t": 0.5},
    }


def test_schedule_of_models_form_needs_the_layer_count():
    config = load_config(
        "merge_method: slerp\nbase_model: a\nmodels: [a, b]\nparameters: {t: [0, 1]}\n"
    )
    with pytest.raises(ConfigError, match="models: no layer_range"):
        schedule(config)
    assert schedule(config, num_layers=3).column("t", OTHER) == [0.0, 0.5, 1.0]


def test_precedence_slice_first_then_top_level_when_no_slice_entry_matches():
    text = slerp_yaml(
        two_model_slice(more="    parameters:\n      t: [{filter: mlp, value: 0.9}]\n"),
        t="[{filter: self_attn, value: 0.1}, {value: 0.4}]",
    )
    config = load_config(text)
    scopes = slice_scopes(config, 0)
    assert interpolation_t("model.layers.0.mlp.up_proj.weight", 0.0, scopes) == (0.9, "mlp")
    assert interpolation_t("model.layers.0.self_attn.q_proj.weight", 0.0, scopes) == (
        0.1,
        "self_attn",
    )
    assert interpolation_t("model.norm.weight", 0.0, scopes) == (0.4, None)


# --- plans on header dicts ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mistral", "llama", "qwen2"])
def test_plan_covers_mergekits_tensors_for_each_architecture(arch):
    config = load_config(slerp_yaml(two_model_slice(), t=PEARL_T.replace("\n", "\n  ")))
    headers = {"a": make_header(arch), "b": make_header(arch)}
    merge_plan = plan(config, headers)

    spec = json.loads((MERGEKIT_ARCHITECTURES / f"{arch}.json").read_text())
    expected = {w["name"] for w in spec["pre_weights"] + spec["post_weights"]}
    for i in range(4):
        expected |= {
            w["name"].replace("${layer_index}", str(i)) for w in spec["layer_templates"]["weights"]
        }
    names = [tensor.name for tensor in merge_plan.tensors]
    assert sorted(names) == sorted(expected)
    assert len(names) == len(set(names))
    assert merge_plan.num_layers == 4
    assert merge_plan.base_model == "a"

    # Order: embeddings, layers in order, final norm, lm_head last.
    assert names[0] == "model.embed_tokens.weight"
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]
    layers = [t.layer for t in merge_plan.tensors if t.layer is not None]
    assert layers == sorted(layers)

    by_name = {t.name: t for t in merge_plan.tensors}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert (q.params, q.matched_filter, q.layer) == ({"t": 0.0}, {"t": "self_attn"}, 0)
    assert q.inputs[0].model == "a" and q.base_index == 0
    up = by_name["model.layers.3.mlp.up_proj.weight"]
    assert (up.params, up.matched_filter, up.x) == ({"t": 0.0}, {"t": "mlp"}, 1.0)
    norm = by_name["model.layers.2.input_layernorm.weight"]
    assert (norm.params, norm.matched_filter) == ({"t": 0.5}, {"t": None})
    if arch == "qwen2":
        bias = by_name["model.layers.1.self_attn.q_proj.bias"]
        assert bias.matched_filter == {"t": "self_attn"}
        assert bias.shape == (8,)


def test_plan_and_schedule_agree_tensor_by_tensor():
    config = load_config(slerp_yaml(two_model_slice(), t=PEARL_T.replace("\n", "\n  ")))
    merge_plan = plan(config, {"a": make_header(), "b": make_header()})
    sched = schedule(config)
    for tensor in merge_plan.tensors:
        if tensor.layer is not None:
            label = tensor.matched_filter["t"] or OTHER
            assert sched.rows[tensor.layer].values["t"][label] == tensor.params["t"]


def test_two_slices_renumber_layers_and_restart_the_gradient():
    slices = two_model_slice(ra=(0, 3), rb=(1, 4)) + two_model_slice(ra=(3, 4), rb=(0, 1))
    config = load_config(slerp_yaml(slices, t="[0, 1]"))
    merge_plan = plan(config, {"a": make_header(), "b": make_header()})
    assert merge_plan.num_layers == 4
    q = {t.layer: t for t in merge_plan.tensors if t.name.endswith("q_proj.weight")}
    assert [q[i].name for i in range(4)] == [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)
    ]
    assert [q[i].params["t"] for i in range(4)] == [0.0, 0.5, 1.0, 1.0]  # n = 1: x = 1
    assert [(i.model, i.tensor) for i in q[0].inputs] == [
        ("a", "model.layers.0.self_attn.q_proj.weight"),
        ("b", "model.layers.1.self_attn.q_proj.weight"),
    ]
    assert [(i.model, i.tensor) for i in q[3].inputs] == [
        ("a", "model.layers.3.self_attn.q_proj.weight"),
        ("b", "model.layers.0.self_attn.q_proj.weight"),
    ]


def test_embeddings_from_first_slice_and_head_from_last_slice():
    slices = two_model_slice() + two_model_slice(
        a="c", b="d", ra=(0, 2), rb=(0, 2), more="    base_model: d\n"
    )
    config = load_config(
        slerp_yaml(
            slices,
            t="[{filter: embed, value: 0.1}, {filter: lm_head, value: 0.9}, {value: [0, 1]}]",
        )
    )
    headers = {name: make_header() for name in "abcd"}
    merge_plan = plan(config, headers)
    by_name = {t.name: t for t in merge_plan.tensors}
    embed, norm, head = (
        by_name[n] for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    )
    assert [i.model for i in embed.inputs] == ["a", "b"] and embed.base_index == 0
    assert [i.model for i in head.inputs] == ["c", "d"] and head.base_index == 1
    assert [i.model for i in norm.inputs] == ["c", "d"]
    # Outside the layers, gradients are read at x = 0.
    assert (embed.params["t"], head.params["t"], norm.params["t"]) == (0.1, 0.9, 0.0)
    assert merge_plan.num_layers == 6


def test_base_model_second_puts_base_index_on_it():
    config = load_config(slerp_yaml(two_model_slice(), base="b", t="0.3"))
    merge_plan = plan(config, {"a": make_header(), "b": make_header()})
    assert {t.base_index for t in merge_plan.tensors} == {1}
    assert all(t.inputs[t.base_index].model == "b" for t in merge_plan.tensors)
    assert merge_plan.base_model == "b"


def test_models_form_uses_all_layers():
    config = load_config(
        "merge_method: slerp\nbase_model: b\nmodels: [a, b]\nparameters: {t: [0, 1]}\n"
    )
    merge_plan = plan(config, {"a": make_header(num_layers=3), "b": make_header(num_layers=3)})
    assert merge_plan.num_layers == 3
    assert sorted({t.params["t"] for t in merge_plan.tensors if t.layer == 1}) == [0.5]
    with pytest.raises(ModelError, match="a has 3, b has 5"):
        plan(config, {"a": make_header(num_layers=3), "b": make_header(num_layers=5)})


def test_tied_embeddings():
    config = load_config(slerp_yaml(two_model_slice()))
    both_tied = plan(config, {"a": make_header(tied=True), "b": make_header(tied=True)})
    assert "lm_head.weight" not in [t.name for t in both_tied.tensors]
    # One model tied: its embeddings stand in for its lm_head, as mergekit's tied_names do.
    one_tied = plan(config, {"a": make_header(tied=True), "b": make_header()})
    head = next(t for t in one_tied.tensors if t.name == "lm_head.weight")
    assert [(i.model, i.tensor) for i in head.inputs] == [
        ("a", "model.embed_tokens.weight"),
        ("b", "lm_head.weight"),
    ]


def test_rotary_buffers_are_not_weights():
    # Older Llama checkpoints store rotary frequencies; mergekit's templates skip them.
    headers = {"a": make_header(), "b": make_header()}
    for header in headers.values():
        header.tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = Meta((4,), torch.float32)
    merge_plan = plan(load_config(slerp_yaml(two_model_slice())), headers)
    assert not any("inv_freq" in t.name for t in merge_plan.tensors)
    assert len(merge_plan.tensors) == 3 + 4 * len(LAYER_TENSORS["mistral"])


def test_output_dtype():
    headers = {"a": make_header(dtype=torch.float16), "b": make_header(dtype=torch.bfloat16)}
    for extra, expected in [
        ("", torch.float16),  # the base tensor's dtype
        ("dtype: bfloat16\n", torch.bfloat16),
        ("dtype: bfloat16\nout_dtype: float32\n", torch.float32),
    ]:
        merge_plan = plan(load_config(slerp_yaml(two_model_slice(), extra=extra)), headers)
        assert {t.dtype for t in merge_plan.tensors} == {expected}
    sized = plan(load_config(slerp_yaml(two_model_slice(), extra="out_dtype: float32\n")), headers)
    assert sized.total_bytes == sum(int(np.prod(t.shape)) * 4 for t in sized.tensors)
    wide = plan(load_config(slerp_yaml(two_model_slice(), extra="dtype: float64\n")), headers)
    assert {t.dtype for t in wide.tensors} == {torch.float64}  # as mergekit: float64 merges
    assert {t["dtype"] for t in wide.to_dict()["tensors"]} == {"float64"}


def test_real_toy_model_headers(tmp_path):
    from pearl_edu.reading import read_header
    from pearl_edu.teaching.toy import make_tiny_model

    a = make_tiny_model(tmp_path / "a", arch="qwen2", num_layers=3)
    b = make_tiny_model(tmp_path / "b", base=a, seed=1, shard_count=2)
    config = load_config(slerp_yaml(two_model_slice(str(a), str(b), (0, 3), (0, 3)), base=str(a)))
    merge_plan = plan(config, {str(a): read_header(a), str(b): read_header(b)})
    assert merge_plan.num_layers == 3
    assert len(merge_plan.tensors) == len(read_header(a).tensors)


# --- errors ------------------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_layer_range_beyond_the_model():
    config = load_config(slerp_yaml(two_model_slice(ra=(2, 6), rb=(0, 4))))
    with pytest.raises(ModelError) as err:
        plan(config, {"a": make_header(num_layers=4), "b": make_header(num_layers=4)})
    message = one_line(err)
    assert "slices[0].sources[0].layer_range: [2, 6] goes beyond a, which has 4 layers" in message


def test_shapes_that_differ_name_the_tensor_both_shapes_and_what_to_do():
    config = load_config(slerp_yaml(two_model_slice()))
    with pytest.raises(ModelError) as err:
        plan(config, {"a": make_header(vocab=32000), "b": make_header(vocab=32007)})
    message = one_line(err)
    assert message.startswith("model.embed_tokens.weight: shapes differ")
    assert "a (32000, 8) vs b (32007, 8)" in message
    assert "give tokenizer_source" in message
    with pytest.raises(ModelError) as err:
        plan(config, {"a": make_header(hidden=8), "b": make_header(hidden=16)})
    assert "same architecture and size" in one_line(err)


def test_missing_tensor_and_missing_header():
    config = load_config(slerp_yaml(two_model_slice()))
    broken = make_header()
    del broken.tensors["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ModelError) as err:
        plan(config, {"a": make_header(), "b": broken})
    assert "b: has no tensor 'model.layers.2.mlp.up_proj.weight'" in one_line(err)
    with pytest.raises(ModelError, match="no header for model 'b'"):
        plan(config, {"a": make_header()})


def test_layer_count_in_config_json_must_match_the_weights():
    header = make_header(num_layers=4)
    header.config["num_hidden_layers"] = 5
    config = load_config(slerp_yaml(two_model_slice()))
    with pytest.raises(ModelError, match="num_hidden_layers=5 but the weights have 4 layers"):
        plan(config, {"a": header, "b": make_header()})


def test_t_without_catch_all_names_the_unmatched_tensor():
    config = load_config(slerp_yaml(two_model_slice(), t="[{filter: mlp, value: 0.2}]"))
    with pytest.raises(ConfigError) as err:
        plan(config, {"a": make_header(), "b": make_header()})
    message = one_line(err)
    assert "parameters.t: no entry matches tensor model.embed_tokens.weight" in message
