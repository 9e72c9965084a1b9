"""The `pearl-edu` command: a thin shell over the functions the notebooks call.

    pearl-edu plan CONFIG [--json]
    pearl-edu merge CONFIG OUTPUT_DIR [--device auto|cpu|cuda[:N]] [--shard-size 5GB] [--force]
    pearl-edu verify DIR_A DIR_B [--atol X] [--max-ulp N] [--scale-ulp N] [--max-fraction F]
                     [--config CONFIG --input-scale-ulp N]

``pearl-edu merge`` also takes mergekit-yaml's everyday options with mergekit 0.1.5's
meaning, so that a mergekit command line such as LazyMergekit's
``mergekit-yaml config.yaml merge --copy-tokenizer --allow-crimes --out-shard-size 1B
--lazy-unpickle`` runs unchanged with ``pearl-edu merge`` in its place.

Errors (bad input, and bad options) are printed as one line and exit with status 2;
``--debug`` shows the traceback instead. ``--debug`` and ``--quiet`` may come before or
after the subcommand.
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from pearl_edu._version import __version__
from pearl_edu.errors import ConfigError, PearlEduError, PearlEduWarning

if TYPE_CHECKING:
    from pearl_edu.config import MergeConfig

EXIT_BAD_INPUT = 2
DEFAULT_SHARD_SIZE = "5GB"
# mergekit's `parse_kmb` (mergekit/common.py): a number, or one ending in k, M or B
# (case-insensitive), meaning thousands, millions, billions; no "1.5B", no "GB".
# mergekit's writer compares the result with tensor bytes (numel * element_size), so
# its "1B" is 10**9 bytes although its help says "parameters".
KMB_FACTORS = {"k": 1000, "m": 1000**2, "b": 1000**3}
# mergekit writes a single file when the size is 0 or less; so do we, with a limit no
# model reaches.
NO_SHARD_LIMIT = 2**62


class _Parser(argparse.ArgumentParser):
    """argparse, with its mistakes reported as one line and exit status 2, like ours."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"pearl-edu: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _everywhere_options(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """--debug and --quiet, accepted before the subcommand and after it.

    After the subcommand their default is SUPPRESS: argparse copies every attribute of the
    subcommand's namespace over the top level's, so a default there would undo a --debug
    given before the subcommand.
    """
    default = False if top_level else argparse.SUPPRESS
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks on errors"
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bar (as mergekit's --quiet; plan never shows one)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pearl-edu",
        description="Merge language models the way mergekit does, streaming one tensor at a time.",
    )
    parser.add_argument("--version", action="version", version=f"pearl-edu {__version__}")
    _everywhere_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plan", help="print which tensor gets which t, without reading weights")
    p.add_argument("config", help="mergekit YAML file, or the name of a shipped recipe")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _everywhere_options(p, top_level=False)
    p.set_defaults(func=_run_plan)

    m = sub.add_parser(
        "merge",
        help="merge the models of a config into OUTPUT_DIR",
        description="Merge the models of CONFIG into OUTPUT_DIR, one tensor at a time. "
        "mergekit-yaml's everyday options are accepted with mergekit 0.1.5's meaning.",
    )
    m.add_argument("config", help="mergekit YAML file, or the name of a shipped recipe")
    m.add_argument("output_dir", help="folder to write the merged model into")
    m.add_argument(
        "--device",
        default=None,
        help="auto (the default), cpu, cuda or cuda:N. auto merges on the CPU, and on a GPU "
        "only a method that a recorded GPU run met its targets in: the device path has not "
        "yet run on a GPU (it is tested on the CPU against its contract), so today auto is "
        "the CPU for every method; the merge prints which and why",
    )
    m.add_argument(
        "--exact",
        action="store_true",
        help="mergekit 0.1.5's bits on any device: on a GPU, SLERP's sums are taken on the "
        "CPU and the other methods run there. Without it a GPU runs everything itself, to a "
        "bound derived in the book (appendix 'The GPU contract') and tested on the CPU, not "
        "yet measured on a GPU; on the CPU the bits are mergekit's either way",
    )
    m.add_argument(
        "--shard-size",
        default=None,
        help="largest output shard in bytes: 5GB (the default), 500MB, 2GiB, 1000000; "
        "here B is bytes, so 1B is one byte (see --out-shard-size)",
    )
    m.add_argument(
        "--force",
        action="store_true",
        help="replace OUTPUT_DIR when it holds a finished merged model (one written by "
        "pearl-edu or mergekit); a folder holding anything else is refused, never deleted",
    )
    m.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write a model whose merged tensors hold infinite or NaN values, with a "
        "one-line warning naming each such tensor, instead of stopping the merge (mergekit "
        "writes them silently)",
    )
    m.add_argument(
        "--threads",
        "--num-threads",
        "-j",
        dest="threads",
        type=int,
        default=None,
        help="CPU threads for the math (default: torch's, one per core, as mergekit); "
        "--num-threads and -j are mergekit's names",
    )
    m.add_argument(
        "--fast-trim",
        action="store_true",
        help="TIES (and any trim by magnitude): among entries of equal magnitude at the cut, "
        "keep the first in the tensor, found by counting instead of sorting: several times "
        "faster and a third of the memory; the output then differs from mergekit's in those "
        "tied entries only (mergekit keeps the ones torch's sort puts first)",
    )
    _everywhere_options(m, top_level=False)

    g = m.add_argument_group(
        "mergekit-yaml's options",
        "Accepted so that a mergekit-yaml command line runs unchanged; each does what it "
        "does in mergekit 0.1.5, or nothing where pearl-edu already behaves that way.",
    )
    g.add_argument(
        "--copy-tokenizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="copy the base model's tokenizer files into OUTPUT_DIR (the default, as in "
        "mergekit); --no-copy-tokenizer leaves them out, with generation_config.json",
    )
    g.add_argument(
        "--out-shard-size",
        metavar="SIZE",
        default=None,
        help="largest output shard, mergekit's way: a number, or one ending in k, M or B "
        "(thousand, million, billion), counted in bytes of tensor data as mergekit's writer "
        "counts them: 1B = --shard-size 1GB; 0 writes a single file. Instead of --shard-size",
    )
    g.add_argument(
        "--cuda",
        action="store_true",
        help="the same as --device cuda (an explicit --device wins, as in mergekit)",
    )
    g.add_argument(
        "--random-seed",
        type=int,
        metavar="N",
        default=None,
        help="seed of the random methods (dare_ties, dare_linear), in place of the YAML's "
        "random_seed (default 0); no effect on the other methods. The same seed always "
        "gives the same model, but not mergekit's (its draws come from torch's global "
        "generator)",
    )
    g.add_argument(
        "--allow-crimes",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="no effect: pearl-edu never compares the models' architectures; it merges "
        "any models whose tensors match by name and shape (and refuses, in one line, "
        "those that do not), taking config.json from the base model",
    )
    g.add_argument(
        "--lazy-unpickle",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="no effect: pearl-edu always reads one tensor at a time; .bin checkpoints are "
        "memory-mapped with torch.load(weights_only=True)",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="print the settings the merge runs with, and set Python's logging to INFO "
        "(-vv: DEBUG) as mergekit's -v does; pearl-edu itself logs nothing else",
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
    v.add_argument(
        "--config",
        default=None,
        metavar="CONFIG",
        help="the merge both models were made by: its input models are read to measure "
        "each element's difference at the scale of its inputs (see --input-scale-ulp)",
    )
    v.add_argument(
        "--input-scale-ulp",
        type=float,
        default=None,
        metavar="N",
        help="also accept a tensor whose elements are at most N steps of its dtype apart, "
        "each step taken at the element's input scale, for SLERP |w0 x| + |w1 y| (a GPU "
        "merge against a CPU one: 1 for bfloat16, the book's appendix 'The GPU contract'); "
        "needs --config",
    )
    _everywhere_options(v, top_level=False)
    v.set_defaults(func=_run_verify)
    return parser


def _run_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pearl_edu.config import load_config
    from pearl_edu.plan_table import show_plan
    from pearl_edu.reading import read_header
    from pearl_edu.tensor_plan import plan

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


def parse_out_shard_size(value: str) -> int:
    """Bytes per shard from mergekit's ``--out-shard-size`` (``parse_kmb``'s grammar).

    ``"1B"`` is 10**9, ``"500M"`` 5 * 10**8, ``"2k"`` 2000, ``"1000"`` 1000. mergekit's
    writer compares this number with bytes of tensor data, so it is bytes here too (the
    same as ``--shard-size 1GB``). 0 or less means one file, as in mergekit.
    """
    try:
        # parse_kmb's steps, in its order, so that the same texts are accepted.
        if value.isnumeric():
            number = int(value)
        elif value[-1:].lower() in KMB_FACTORS:
            number = int(value[:-1]) * KMB_FACTORS[value[-1].lower()]
        else:
            raise ValueError(value)
    except ValueError:
        raise ConfigError(
            f"--out-shard-size {value!r} is not understood: expected a whole number, "
            "optionally ending in k, M or B (thousand, million, billion), such as 1B"
        ) from None
    return number if number > 0 else NO_SHARD_LIMIT


def _shard_size(args: argparse.Namespace) -> str | int:
    if args.out_shard_size is not None and args.shard_size is not None:
        raise ConfigError("give --shard-size or --out-shard-size, not both")
    if args.out_shard_size is not None:
        return parse_out_shard_size(args.out_shard_size)
    return args.shard_size if args.shard_size is not None else DEFAULT_SHARD_SIZE


def _with_random_seed(config: MergeConfig, seed: int) -> MergeConfig:
    """``config`` with ``random_seed: seed`` in place of any seed its YAML gives.

    The seed goes into the YAML kept with the config too, so that it is recorded in
    mergekit_config.yml and a resumed merge with another seed is not taken for this one.
    Methods without randomness are left as they are: the seed cannot change them.
    """
    from pearl_edu.config import SEED_KEYS, parse_config
    from pearl_edu.methods import METHODS

    if not METHODS[config.merge_method].random:
        return config
    raw = {key: value for key, value in config.raw.items() if key not in SEED_KEYS}
    raw["random_seed"] = seed
    return parse_config(raw, config.source)


def _run_merge(args: argparse.Namespace) -> int:
    from pearl_edu.config import load_config
    from pearl_edu.engine import merge
    from pearl_edu.methods import METHODS
    from pearl_edu.output import parse_size
    from pearl_edu.pipeline import return_freed_memory_to_the_system

    shard_size = _shard_size(args)
    device = args.device if args.device is not None else ("cuda" if args.cuda else "auto")
    config = load_config(args.config)
    if args.random_seed is not None:
        config = _with_random_seed(config, args.random_seed)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO)
        random = METHODS[config.merge_method].random
        shard_bytes = parse_size(shard_size)
        settings = [
            f"{config.merge_method} of {len(config.models())} models",
            f"device {device}",
            "a single weight file"
            if shard_bytes >= NO_SHARD_LIMIT
            else f"shards of at most {shard_bytes} bytes",
            f"random seed {config.random_seed}" if random else "no random seed used",
            "tokenizer copied" if args.copy_tokenizer else "tokenizer left out",
        ]
        if args.fast_trim:
            settings.append("ties at the trim's cut kept by position (--fast-trim)")
        if args.exact:
            settings.append("mergekit's bits on any device (--exact)")
        print(f"pearl-edu: {', '.join(settings)}", file=sys.stderr)

    # The command's own process: glibc's allocator tuned for good, which a library call
    # of merge() never does (the tuning cannot be undone).
    return_freed_memory_to_the_system()
    result = merge(
        config,
        args.output_dir,
        device=device,
        shard_size=shard_size,
        force=args.force,
        progress=False if args.quiet else None,
        threads=args.threads,
        copy_tokenizer=args.copy_tokenizer,
        fast_trim=args.fast_trim,
        backend="exact" if args.exact else "auto",
        allow_nonfinite=args.allow_nonfinite,
    )
    resumed = f", {result.resumed_tensors} resumed" if result.resumed_tensors else ""
    print(
        f"merged {result.num_tensors} tensors{resumed} into {result.output_dir} "
        f"({len(result.weight_files)} weight files) on {result.device} "
        f"({result.device_reason}) in {result.seconds:.1f} s"
    )
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pearl_edu.verification import verify

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
            config=args.config,
            input_scale_ulp=args.input_scale_ulp,
        )
    finally:
        if bar is not None:
            bar.close()
    print(report.summary())
    # Like diff(1): 0 when the models agree, 1 when they differ (2 is for bad input).
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = None
    try:
        if argv is None:
            # Run as a command: everything imported so far (torch above all) lives until
            # the process ends, and moving it out of the garbage collector's sight saves
            # its final sweep, about 0.4 s at exit.
            gc.freeze()
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        with warnings.catch_warnings():
            warnings.simplefilter("always", category=PearlEduWarning)
            warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except PearlEduError as err:
        if args is not None and args.debug:
            raise
        print(f"pearl-edu: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("pearl-edu: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """pearl_edu's warnings printed as the errors are: one line, no source location."""
    if issubclass(category, PearlEduWarning):
        print(f"pearl-edu: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


if __name__ == "__main__":
    raise SystemExit(main())
