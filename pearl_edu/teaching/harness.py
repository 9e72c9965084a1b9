"""mini-Pearl through lm-evaluation-harness, the tool the Open LLM Leaderboard used.

The harness (``pip install lm-eval``) runs a model on a *task*: a YAML file that says where
the items are, how each becomes a prompt, how the model answers (here: greedy generation)
and how an answer is scored. Its built-in tasks download their data sets from the Hugging
Face Hub; a local task reads a JSONL file instead, so the run needs no network:

- `write_addition_task` writes mini-Pearl's held-out additions as such a task, the same
  items, prompts and exact-match scoring as `evaluation.item_scores`;
- `run_task` runs the harness on a model folder, offline and quietly, and returns its
  accuracy, its standard error and every item's result, in the items' order;
- `gpu_command` is the command that evaluates a published model on one of the
  leaderboard's tasks, for a machine with a GPU (this book has not run it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pearl_edu.teaching import minipearl

TASK = "mini_pearl_addition"

# The task: one addition per JSONL line, the prompt "07+35=" and the answer "042"; three
# greedy tokens, scored by exact match, as `minipearl.greedy_answers` and `item_scores` do.
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: {digits}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_addition_task(
    folder: str | Path, problems: Sequence[tuple[int, int]], task: str = TASK
) -> Path:
    """Write ``problems`` as an lm-evaluation-harness task in ``folder``; return the folder.

    The folder gets ``{task}.jsonl`` (the items) and ``{task}.yaml`` (the task, which
    reads the JSONL by its absolute path); pass it to `run_task`.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task}.jsonl"
    lines = (
        json.dumps(
            {"prompt": minipearl.addition_prompt(a, b), "answer": minipearl.addition_answer(a, b)}
        )
        for a, b in problems
    )
    data.write_text("\n".join(lines) + "\n")
    (folder / f"{task}.yaml").write_text(
        TASK_YAML.format(task=task, data=json.dumps(str(data)), digits=minipearl.ANSWER_DIGITS)
    )
    return folder


@dataclass(frozen=True)
class HarnessResult:
    """The harness's score of one model on one task, and each item's result in order."""

    accuracy: float
    stderr: float
    right: tuple[bool, ...]
    answers: tuple[str, ...]


@contextlib.contextmanager
def offline_and_quiet() -> Iterator[None]:
    """No network (the Hub and data sets offline), and nothing written to stderr.

    The harness and the libraries under it draw progress bars and log warnings on stderr,
    and look up their own git commit with a subprocess; all of it is set aside (at the file
    descriptor, so the subprocess too), and an error still raises as usual.
    """
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    sys.stderr.flush()
    stderr_fd = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(devnull.fileno(), 2)
            with minipearl.quiet_transformers():
                yield
    finally:
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_task(
    model_folder: str | Path, task_folder: str | Path, task: str = TASK, batch_size: int = 100
) -> HarnessResult:
    """Run lm-evaluation-harness on the model in ``model_folder`` with the local task.

    The model is read in float32 on the CPU, its tokenizer adds ``<s>`` like mini-Pearl's
    own scorer, and nothing is downloaded.
    """
    with offline_and_quiet():
        import lm_eval
        from lm_eval.tasks import TaskManager

        tasks = TaskManager(include_path=str(Path(task_folder).resolve()), include_defaults=False)
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={Path(model_folder).resolve()},dtype=float32,add_bos_token=True",
            tasks=[task],
            task_manager=tasks,
            device="cpu",
            batch_size=batch_size,
            log_samples=True,
        )
    scores = results["results"][task]
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return HarnessResult(
        accuracy=float(scores["exact_match,none"]),
        stderr=float(scores["exact_match_stderr,none"]),
        right=tuple(bool(sample["exact_match"]) for sample in samples),
        answers=tuple(sample["filtered_resps"][0] for sample in samples),
    )


# The leaderboard's six tasks, by the names of the installed harness, with its number of shots.
LEADERBOARD_TASKS = {
    "arc_challenge": 25,
    "hellaswag": 10,
    "mmlu": 5,
    "truthfulqa_mc2": 0,
    "winogrande": 5,
    "gsm8k": 5,
}


def gpu_command(model: str, task: str, shots: int, output: str = "results") -> str:
    """The shell command that evaluates a Hub model on a harness task on a CUDA GPU.

    ``--log_samples`` keeps every item's result, which a paired comparison needs.
    """
    return (
        "lm_eval --model hf \\\n"
        f"  --model_args pretrained={model},dtype=float16 \\\n"
        f"  --tasks {task} --num_fewshot {shots} \\\n"
        "  --device cuda:0 --batch_size auto \\\n"
        f"  --output_path {output} --log_samples"
    )
