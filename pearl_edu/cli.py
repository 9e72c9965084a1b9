"""The `pearl-edu` command: a thin shell over the functions the notebooks call.

    pearl-edu plan CONFIG [--json]
    pearl-edu merge CONFIG OUTPUT_DIR [--device auto|cpu|cuda[:N]] [--shard-size 5GB] [--force]
    pearl-edu moe CONFIG OUTPUT_DIR [--force] [--shard-size 5GB] [--random-seed N]
    pearl-edu extract-lora --model MODEL --base BASE [--rank R] OUTPUT_DIR
    pearl-edu verify DIR_A DIR_B [--atol X] [--max-ulp N] [--scale-ulp N] [--max-fraction F]
                     [--config CONFIG --input-scale-ulp N]

Its options, mergekit-yaml's everyday ones among them, are `pearl_edu.cli_options`.

Errors (bad input, and bad options) are printed as one line and exit with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from pearl_edu.cli_options import EXIT_BAD_INPUT, build_parser
from pearl_edu.errors import ConfigError, PearlEduError, PearlEduWarning, UnknownKeyWarning

if TYPE_CHECKING:
    from pearl_edu.config import MergeConfig

DEFAULT_SHARD_SIZE = "5GB"
# mergekit's `parse_kmb` (mergekit/common.py): a number, or one ending in k, M or B
# (case-insensitive), meaning thousands, millions, billions; no "1.5B", no "GB".
# mergekit's writer compares the result with tensor bytes (numel * element_size), so
# its "1B" is 10**9 bytes although its help says "parameters".
KMB_FACTORS = {"k": 1000, "m": 1000**2, "b": 1000**3}
# mergekit writes a single file when the size is 0 or less; so do we, with a limit no
# model reaches.
NO_SHARD_LIMIT = 2**62


def _run_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pearl_edu.adapters import split_reference
    from pearl_edu.config import load_config
    from pearl_edu.plan_table import show_plan
    from pearl_edu.reading import read_header
    from pearl_edu.tensor_plan import plan
    from pearl_edu.vocabulary import VocabularyAlignment

    config = load_config(args.config, strict=args.strict)
    # Only folders on this machine are read: `plan` never downloads, so Hub ids that are
    # not present locally leave us with the schedule that layer_range alone determines.
    # A LoRA changes no shape: `base+adapter` is planned from its base's header.
    folders = {model: Path(split_reference(model)[0]) for model in config.models()}
    unread = [model for model, folder in folders.items() if not folder.is_dir()]
    merge_plan = None
    if not unread:
        headers = {model: read_header(folder) for model, folder in folders.items()}
        # With a tokenizer option, the vocabulary tensors are planned in the output's
        # vocabulary, as `merge` plans them.
        headers = VocabularyAlignment(config, headers, folders).headers
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
    with warnings.catch_warnings():  # the keys were warned about when the config was read
        warnings.simplefilter("ignore", UnknownKeyWarning)
        return parse_config(raw, config.source)


def _run_merge(args: argparse.Namespace) -> int:
    from pearl_edu.config import load_config
    from pearl_edu.engine import merge
    from pearl_edu.methods import METHODS
    from pearl_edu.output import parse_size
    from pearl_edu.process_settings import return_freed_memory_to_the_system

    shard_size = _shard_size(args)
    device = args.device if args.device is not None else ("cuda" if args.cuda else "auto")
    config = load_config(args.config, strict=args.strict)
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
        if args.backend != "auto":
            settings.append(f"the {args.backend} backend (--backend {args.backend})")
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
        backend=args.backend,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(
        f"merged {_written(result)} on {result.device} ({result.device_reason}) "
        f"in {result.seconds:.1f} s"
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


def _run_moe(args: argparse.Namespace) -> int:
    from pearl_edu.moe import build_moe

    result = build_moe(
        args.config,
        args.output_dir,
        force=args.force,
        copy_tokenizer=args.copy_tokenizer,
        shard_size=args.shard_size,
        allow_all_same=args.allow_all_same,
        random_seed=args.random_seed,
        progress=False if args.quiet else None,
        strict=args.strict,
    )
    print(
        f"built a {result.architecture} of {result.num_experts} experts: "
        f"{_written(result)} in {result.seconds:.1f} s"
    )
    return 0


def _written(result: Any) -> str:
    """``N tensors[, K resumed] into DIR (F weight files)``: what a merge or a build wrote."""
    resumed = f", {result.resumed_tensors} resumed" if result.resumed_tensors else ""
    return (
        f"{result.num_tensors} tensors{resumed} into {result.output_dir} "
        f"({len(result.weight_files)} weight files)"
    )


def _run_extract_lora(args: argparse.Namespace) -> int:
    from pearl_edu.extract_lora import ExtractOptions, extract_lora

    options = ExtractOptions(
        rank=args.rank,
        distribute_scale=args.distribute_scale,
        embed_lora=args.embed_lora,
        modules_to_save=tuple(args.modules_to_save),
        include_regexes=tuple(args.include_regexes),
        exclude_regexes=tuple(args.exclude_regexes),
        sv_epsilon=args.sv_epsilon,
        skip_undecomposable=args.skip_undecomposable,
    )
    output = extract_lora(args.model, args.base, args.output_dir, options, force=args.force)
    print(f"extracted a LoRA adapter of {args.model} (base {args.base}) into {output}")
    return 0


# What each subcommand of `build_parser` runs.
COMMANDS = {
    "plan": _run_plan,
    "merge": _run_merge,
    "moe": _run_moe,
    "verify": _run_verify,
    "extract-lora": _run_extract_lora,
}


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
            return int(COMMANDS[args.command](args) or 0)
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
