"""The book's teaching helpers, apart from the merge engine.

- `minipearl`: mini-Pearl, Pearl-7B-slerp's story re-enacted with models trained on a laptop;
- `connectivity`: the loss along the straight path between two models (chapter 08);
- `toy`: tiny but real Hugging Face models for the chapters and the tests;
- `fullrun`: the full Pearl-7B-slerp run step by step, and its offline stand-ins (chapter 09);
- `preflight`: what the full run needs of a machine, decided before any download;
- `notebook`: `setup`, one call that sets the stage for every chapter;
- `seed`: the leaderboard of the book's opening chapter.
- `interactive`: figures with sliders that work in the HTML book with no kernel (04, 06, 08);
- `answers`: the checks of the exercises' answers in the student edition;
- `student`: the student edition, ``python -m pearl_edu.teaching.student`` (``make student``);
- `capstone`: the course's last project and its automatic check;
- `lora`: mini-Pearl's parents fine-tuned as LoRA adapters with PEFT, and cached (chapter 15).
- `alignment`: the reorderings of a Mistral's units that keep its function, and weight
  matching to align one model with another (chapter 18);
- `datamerge`: Fisher merging and RegMean, from each parent's statistics on a few held-out
  items (chapter 19).

``import pearl_edu`` loads none of them, nor what only they need (matplotlib,
transformers: the ``teaching`` extra, ``pip install "pearl-edu[teaching]"``). Import the one
you want, ``from pearl_edu.teaching import minipearl``; the names a chapter reaches for most
(``pearl_edu.setup()``, ``pearl_edu.make_tiny_model``, ...) also load their module on first use.
"""
