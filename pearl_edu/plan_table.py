"""How a plan is shown: the text and the JSON that ``pearl-edu plan`` prints.

`pearl_edu.plan` decides which tensor gets which ``t``, and `pearl_edu.layer_schedule` what
each parameter is worth at each layer; this module only puts what they decided together,
for people (the schedule's table and the tensors outside the layers) and for programs
(plain data for JSON).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pearl_edu.config import MergeConfig
from pearl_edu.layer_schedule import OTHER, cell, schedule
from pearl_edu.methods import METHODS
from pearl_edu.tensor_plan import MergePlan, TensorPlan


def show_plan(
    config: MergeConfig,
    merge_plan: MergePlan | None = None,
    *,
    unread: Sequence[str] = (),
    as_json: bool = False,
) -> str:
    """The text (or JSON) that ``pearl-edu plan`` prints for a config.

    With ``merge_plan`` (built from the models' headers) it lists every tensor outside the
    layers and, in JSON, every tensor; without it, the schedule comes from ``layer_range``
    alone and ``unread`` names the models that were not available locally.
    """
    num_layers = merge_plan.num_layers if merge_plan else None
    sched = schedule(config, num_layers)
    if as_json:
        data: dict[str, Any] = {
            "config": config.source,
            "merge_method": config.merge_method,
            "config_hash": config.config_hash(),
            "slices": slice_summaries(config),
            "models_read": merge_plan is not None,
            "unread_models": list(unread),
            "schedule": sched.to_dict(),
        }
        if merge_plan is not None:
            data["plan"] = merge_plan.to_dict()
        return json.dumps(data, indent=2)

    lines = [f"{config.source}: {config.merge_method}, dtype {config.dtype or 'of each input'}"]
    if METHODS[config.merge_method].random:
        lines[0] += f", random seed {config.random_seed}"
    base_note = " (t = 0)" if config.merge_method == "slerp" else ""
    for summary in slice_summaries(config):
        base = summary["base_model"]
        lines.append(
            f"  slice {summary['slice']}: "
            + (f"base {base}{base_note}; " if base is not None else "")
            + ", ".join(f"{s['model']} layers {s['layer_range']}" for s in summary["sources"])
        )
    if merge_plan is None:
        lines.append(
            f"{len(sched.rows)} output layers, from layer_range alone "
            f"(models not read: {', '.join(unread) or 'none'})"
        )
    else:
        lines.append(
            f"{merge_plan.num_layers} output layers, {len(merge_plan.tensors)} tensors, "
            f"{merge_plan.total_bytes / 1e9:.3f} GB"
        )
        if sched.moves_layers:
            donor = sched.model_labels.get(merge_plan.base_model, merge_plan.base_model)
            lines[-1] += f"; config.json from {donor}"
    lines += ["", sched.table(), "", "outside the layers (x = 0):"]
    # Where layers are stacked, say which models the tensors outside them come from.
    labels = sched.model_labels

    def origin(models: Sequence[str]) -> str:
        return f"from {', '.join(labels.get(m, m) for m in models)}  " if sched.moves_layers else ""

    if merge_plan is None:
        for name, values in sched.outside_layers.items():
            cells = "  ".join(f"{p} = {cell(v)}" for p, v in values.items())
            lines.append(f"  {name}  {origin(sched.outside_sources[name])}{cells}".rstrip())
    else:
        for tensor in merge_plan.outside_layers():
            models = [i.model for i in tensor.inputs]
            lines.append(f"  {tensor.name}  {origin(models)}{param_cells(tensor)}".rstrip())
    return "\n".join(lines)


def param_cells(tensor: TensorPlan) -> str:
    """``t = 0.5000 (other)`` for each parameter, ``weight@b = ...`` for each per-model one."""
    cells = [
        f"{p} = {cell(v)} ({tensor.matched_filter.get(p) or OTHER})"
        for p, v in tensor.params.items()
    ]
    labels = [i.model.rstrip("/").rsplit("/", 1)[-1] for i in tensor.inputs]
    for label, values, filters in zip(
        labels, tensor.input_params, tensor.input_filters, strict=True
    ):
        cells += [f"{p}@{label} = {cell(v)} ({filters.get(p) or OTHER})" for p, v in values.items()]
    return "  ".join(cells)


def slice_summaries(config: MergeConfig) -> list[dict[str, Any]]:
    """Per slice: its base model and its sources with their layer ranges."""
    return [
        {
            "slice": index,
            "base_model": config.slice_base(index),
            "sources": [
                {
                    "model": s.model,
                    "layer_range": list(s.layer_range) if s.layer_range else "all",
                }
                for s in sl.sources
            ],
        }
        for index, sl in enumerate(config.slices)
    ]
