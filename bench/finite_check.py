"""What refusing non-finite results costs: `is_finite` on every tensor of a Mistral-7B merge.

    python bench/finite_check.py [--runs 5] [--layers 32]

`pearl_edu.finite.check_finite` looks at every merged tensor once (one ``aminmax`` pass)
before it is written. This times that pass on bfloat16 tensors of each shape of
Mistral-7B (Pearl's parents), one tensor per shape reused for every tensor of that shape,
with torch's default threads, and prints the total for the whole model: the median over
``--runs`` of each shape's time, times the number of tensors of that shape, and records
it in ``bench/finite_check.json`` (the book's performance appendix reads it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pearl_edu.finite import is_finite  # noqa: E402
from pearl_edu.teaching.toy import hf_config, tensor_shapes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    config = hf_config(
        arch="mistral",
        num_layers=args.layers,
        hidden_size=4096,
        intermediate_size=14336,
        num_heads=32,
        num_kv_heads=8,
        vocab_size=32000,
        tie_embeddings=False,
    )
    shapes = Counter(tensor_shapes(config).values())
    total = 0.0
    elements = 0
    for shape, count in sorted(shapes.items(), key=lambda item: -item[1]):
        tensor = torch.randn(shape).to(torch.bfloat16)
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            assert is_finite(tensor)
            times.append(time.perf_counter() - started)
        total += statistics.median(times) * count
        elements += tensor.numel() * count
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpu": platform.machine(),
            "cpu_count": os.cpu_count(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0],
        },
        "layers": args.layers,
        "tensors": sum(shapes.values()),
        "elements": elements,
        "runs": args.runs,
        "seconds": round(total, 3),
    }
    (REPO_ROOT / "bench" / "finite_check.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"is_finite over {len(shapes)} shapes, {sum(shapes.values())} tensors, "
        f"{elements / 1e9:.2f}B bfloat16 numbers ({args.layers} layers), "
        f"{torch.get_num_threads()} threads: {total:.2f} s in all "
        f"(median of {args.runs} runs per shape)"
    )


if __name__ == "__main__":
    main()
