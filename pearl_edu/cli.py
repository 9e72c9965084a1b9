"""The `pearl-edu` command: a thin shell over the functions the notebooks call.

    pearl-edu plan CONFIG [--json]
    pearl-edu merge CONFIG OUTPUT_DIR [--device auto|cpu|cuda[:N]] [--shard-size 5GB] [--force]
    pearl-edu verify DIR_A DIR_B [--atol X] [--max-ulp N] [--scale-ulp N] [--max-fraction F]

Errors caused by the input are printed as one line and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from pearl_edu._version import __version__
from pearl_edu.errors import PearlEduError

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pearl-edu",
        description="Merge language models the way mergekit does, streaming one tensor at a time.",
    )
    parser.add_argument("--version", action="version", version=f"pearl-edu {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plan", help="print which tensor gets which t, without reading weights")
    p.add_argument("config", help="mergekit YAML file, or the name of a shipped recipe")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run_plan)

    m = sub.add_parser("merge", help="merge the models of a config into OUTPUT_DIR")
    m.add_argument("config", help="mergekit YAML file, or the name of a shipped recipe")
    m.add_argument("output_dir", help="folder to write the merged model into")
    m.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    m.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB)")
    m.add_argument("--force", action="store_true", help="replace a non-empty OUTPUT_DIR")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the math (default: torch's, one per core, as mergekit)",
    )
    m.set_defaults(func=_run_merge)

    v = sub.add_parser("verify", help="compare two model folders tensor by tensor")
    v.add_argument("dir_a")
    v.add_argument("dir_b")
    v.add_argument("--atol", type=float, default=0.0, help="largest difference accepted")
    v.add_argument(
        "--max-ulp",
        type=int,
        default=None,
        metavar="N",
        help="also accept a tensor whose elements are at most N units in the last place apart",
    )
    v.add_argument(
        "--scale-ulp",
        type=float,
        default=None,
        metavar="N",
        help="also accept a tensor whose elements are at most N steps of its dtype apart, "
        "a step taken at the tensor's largest value (against the published Pearl-7B-slerp: 1)",
    )
    v.add_argument(
        "--max-fraction",
        type=float,
        default=None,
        metavar="F",
        help="and require that at most this share of each tensor's elements differ "
        "(against the published Pearl-7B-slerp: 0.25)",
    )
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=_run_verify)
    return parser


def _run_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pearl_edu.config import load_config
    from pearl_edu.io import read_header
    from pearl_edu.plan import plan, show_plan

    config = load_config(args.config)
    # Only folders on this machine are read: `plan` never downloads, so Hub ids that are
    # not present locally leave us with the schedule that layer_range alone determines.
    unread = [model for model in config.models() if not Path(model).is_dir()]
    merge_plan = None
    if not unread:
        headers = {model: read_header(model) for model in config.models()}
        merge_plan = plan(config, headers)
    print(show_plan(config, merge_plan, unread=unread, as_json=args.json))
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from pearl_edu.merge import merge

    result = merge(
        args.config,
        args.output_dir,
        device=args.device,
        shard_size=args.shard_size,
        force=args.force,
        progress=False if args.quiet else None,
        threads=args.threads,
    )
    resumed = f", {result.resumed_tensors} resumed" if result.resumed_tensors else ""
    print(
        f"merged {result.num_tensors} tensors{resumed} into {result.output_dir} "
        f"({len(result.weight_files)} weight files) on {result.device} "
        f"in {result.seconds:.1f} s"
    )
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pearl_edu.verify import verify

    bar = None

    def show_progress(done: int, total: int, name: str) -> None:
        # The bar appears with the first compared tensor, so that an error about the
        # input folders is printed alone.
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="verify", unit="tensor", file=sys.stderr, leave=False)
        bar.update(done - bar.n)

    try:
        progress = None if args.quiet else show_progress
        report = verify(
            args.dir_a,
            args.dir_b,
            atol=args.atol,
            max_ulp=args.max_ulp,
            scale_ulp=args.scale_ulp,
            max_fraction=args.max_fraction,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    print(report.summary())
    # Like diff(1): 0 when the models agree, 1 when they differ (2 is for bad input).
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        # Run as a command: everything imported so far (torch above all) lives until the
        # process ends, and moving it out of the garbage collector's sight saves its final
        # sweep, about 0.4 s at exit.
        gc.freeze()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except PearlEduError as err:
        if args.debug:
            raise
        print(f"pearl-edu: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("pearl-edu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
