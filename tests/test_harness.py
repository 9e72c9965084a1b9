"""mini-Pearl through lm-evaluation-harness (pearl_edu.teaching.harness), offline."""

from __future__ import annotations

import json
import os
import re
from importlib import resources

import pytest
import torch
import yaml

from pearl_edu.teaching import harness, minipearl

PROBLEMS = [(7, 35), (99, 1), (50, 50), (12, 9), (83, 47), (0, 0)]


def test_the_task_file_holds_the_books_prompts_and_answers(tmp_path):
    folder = harness.write_addition_task(tmp_path / "task", PROBLEMS)
    task = yaml.safe_load((folder / f"{harness.TASK}.yaml").read_text())
    assert task["task"] == harness.TASK and task["output_type"] == "generate_until"
    data = task["dataset_kwargs"]["data_files"]["test"]
    assert data == str(folder / f"{harness.TASK}.jsonl") and data.startswith("/")
    assert task["generation_kwargs"]["max_gen_toks"] == minipearl.ANSWER_DIGITS
    assert task["generation_kwargs"]["do_sample"] is False
    items = [
        json.loads(line) for line in (folder / f"{harness.TASK}.jsonl").read_text().splitlines()
    ]
    assert items == [
        {"prompt": minipearl.addition_prompt(a, b), "answer": minipearl.addition_answer(a, b)}
        for a, b in PROBLEMS
    ]
    assert items[0] == {"prompt": "07+35=", "answer": "042"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained one-layer mini-Pearl: its answers are arbitrary, so agreeing on them is a test."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = minipearl.build_tokenizer()
    model = minipearl.new_model(tokenizer, minipearl.ModelShape(num_layers=1), seed=3)
    minipearl.save_model(model, tokenizer, folder, dtype=torch.float32)
    return folder


def test_the_harness_gives_the_books_greedy_answers_offline(tmp_path, tiny_model, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = harness.write_addition_task(tmp_path / "task", PROBLEMS)
    result = harness.run_task(tiny_model, folder, batch_size=4)
    model = minipearl.load_model(tiny_model)
    tokenizer = minipearl.load_tokenizer(tiny_model)
    prompts = [minipearl.addition_prompt(a, b) for a, b in PROBLEMS]
    with minipearl.torch_threads(1):
        ours = minipearl.greedy_answers(model, tokenizer, prompts, minipearl.ANSWER_DIGITS)
    # The harness stops at </s> and drops special tokens from what it decodes.
    expected = [re.sub(r"<[^>]*>", "", answer.split("</s>")[0]) for answer in ours]
    assert list(result.answers) == expected
    assert len(set(expected)) > 1  # arbitrary, and not all the same
    truth = [minipearl.addition_answer(a, b) for a, b in PROBLEMS]
    assert result.right == tuple(a == t for a, t in zip(expected, truth, strict=True))
    assert result.accuracy == sum(result.right) / len(PROBLEMS)
    assert "HF_HUB_OFFLINE" not in os.environ  # restored after the run


def test_the_leaderboard_tasks_exist_in_the_installed_harness():
    names = set()
    for path in resources.files("lm_eval.tasks").rglob("*.yaml"):
        names.update(re.findall(r"^(?:task|group): (\S+)\s*$", path.read_text(), re.M))
    assert set(harness.LEADERBOARD_TASKS) <= names
    command = harness.gpu_command("louisbrulenaudet/Pearl-7B-slerp", "gsm8k", 5)
    assert "--tasks gsm8k --num_fewshot 5" in command and "--log_samples" in command
