"""The `pearl-edu` command's options: its argument parser, with every option's help.

``pearl-edu merge`` also takes mergekit-yaml's everyday options with mergekit 0.1.5's
meaning, so that a mergekit command line such as LazyMergekit's
``mergekit-yaml config.yaml merge --copy-tokenizer --allow-crimes --out-shard-size 1B
--lazy-unpickle`` runs unchanged with ``pearl-edu merge`` in its place.

Bad options are printed as one line and exit with status 2, as bad input is
(`pearl_edu.cli`). ``--debug`` and ``--quiet`` may come before or after the subcommand.
"""

from __future__ import annotations

import argparse
import sys

from pearl_edu._version import __version__

EXIT_BAD_INPUT = 2


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


def _strict_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse config keys that mergekit ignores (by default each is a one-line warning "
        "and is ignored, as in mergekit)",
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
    _strict_option(p)
    _everywhere_options(p, top_level=False)

    m = sub.add_parser(
        "merge",
        help="merge the models of a config into OUTPUT_DIR",
        description="Merge the models of CONFIG into OUTPUT_DIR, one tensor at a time. "
        "mergekit-yaml's everyday options are accepted with mergekit 0.1.5's meaning.",
    )
    m.add_argument("config", help="mergekit YAML file, or the name of a shipped recipe")
    m.add_argument("output_dir", help="folder to write the merged model into")
    _strict_option(m)
    m.add_argument(
        "--device",
        default=None,
        help="auto (the default), cpu, cuda or cuda:N. auto merges on the CPU, and on a GPU "
        "only a method that a recorded GPU run met its targets in: the device path has not "
        "yet run on a GPU (it is tested on the CPU against its contract), so today auto is "
        "the CPU for every method; the merge prints which and why",
    )
    m.add_argument(
        "--backend",
        choices=("auto", "reference", "cpu", "device"),
        default="auto",
        help="what runs the math: reference, the core as the book prints it (slow; the "
        "same bits as cpu); cpu, mergekit 0.1.5's bits, fast, on any device (on a GPU, "
        "SLERP's sums are taken on the CPU and the other methods run there); device, "
        "everything on the device, to a bound derived in the book (appendix 'The GPU "
        "contract') and tested on the CPU, not yet measured on a GPU. auto (the default) "
        "is device on a GPU and cpu elsewhere",
    )
    m.add_argument(
        "--exact",
        dest="backend",
        action="store_const",
        const="cpu",
        help="the same as --backend cpu: mergekit 0.1.5's bits on any device",
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

    _moe_parser(sub)
    _extract_lora_parser(sub)

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
    return parser


def _moe_parser(sub: argparse._SubParsersAction) -> None:
    """``pearl-edu moe CONFIG OUTPUT_DIR``: mergekit-moe's YAML, mergekit-moe's model."""
    e = sub.add_parser(
        "moe",
        help="build a mixture of experts from a mergekit-moe config into OUTPUT_DIR",
        description="Build the mixture of experts of a mergekit-moe CONFIG into OUTPUT_DIR, "
        "one tensor at a time: the model mergekit-moe 0.1.5 writes for it (Mixtral, or "
        "Qwen2-MoE for a config with a shared expert; DeepSeek MoE and Qwen3 MoE are refused).",
    )
    e.add_argument("config", help="mergekit-moe YAML file")
    e.add_argument("output_dir", help="folder to write the MoE model into")
    e.add_argument(
        "--force",
        action="store_true",
        help="replace OUTPUT_DIR when it holds a finished model folder (a MoE or a merge)",
    )
    e.add_argument(
        "--copy-tokenizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="copy the base model's tokenizer files into OUTPUT_DIR (the default)",
    )
    e.add_argument(
        "--shard-size",
        default="5GB",
        help="largest output shard in bytes: 5GB (the default), 500MB, 2GiB, 1000000",
    )
    e.add_argument(
        "--random-seed",
        type=int,
        metavar="N",
        default=0,
        help="seed of the random draws (gate_mode random or uniform_random, noise_scale), "
        "default 0; the same seed gives the same model (mergekit draws from torch's global "
        "generator instead)",
    )
    e.add_argument(
        "--i-understand-this-is-not-useful-without-training",
        dest="allow_all_same",
        action="store_true",
        help="build even when every expert is the same model, as mergekit's flag of that name",
    )
    _strict_option(e)
    _everywhere_options(e, top_level=False)


def _extract_lora_parser(sub: argparse._SubParsersAction) -> None:
    """``pearl-edu extract-lora``: mergekit-extract-lora's options, with its defaults."""
    x = sub.add_parser(
        "extract-lora",
        help="extract a LoRA adapter (MODEL minus BASE, rank R) into OUTPUT_DIR",
        description="Write the PEFT LoRA adapter that takes BASE to MODEL: the rank-R "
        "truncated SVD of each linear layer's task vector, one module at a time, as "
        "mergekit-extract-lora 0.1.5 does. Apply it with 'model: BASE+OUTPUT_DIR'.",
    )
    x.add_argument("output_dir", help="folder to write the adapter into (mergekit's --out-path)")
    x.add_argument("--model", required=True, help="the fine-tuned model (folder or repo id)")
    x.add_argument(
        "--base",
        "--base-model",
        dest="base",
        required=True,
        help="the base model it was tuned from",
    )
    x.add_argument(
        "--rank",
        "--max-rank",
        dest="rank",
        type=int,
        default=128,
        help="largest rank of each LoRA (mergekit's --max-rank, default 128); a layer's rank "
        "is at most its matrix's",
    )
    x.add_argument(
        "--distribute-scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give A and B each the square root of the singular values (the default); "
        "without it A takes them whole",
    )
    x.add_argument(
        "--embed-lora",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="decompose the input embeddings too, as PEFT's embedding LoRA (default: save "
        "the embeddings whole in modules_to_save)",
    )
    x.add_argument(
        "--save-module",
        dest="modules_to_save",
        action="append",
        default=[],
        metavar="NAME",
        help="save this module (a full name or its last part) whole; may be repeated",
    )
    x.add_argument(
        "-i",
        "--include-regex",
        dest="include_regexes",
        action="append",
        default=[],
        metavar="REGEX",
        help="decompose only modules matching a REGEX; may be repeated",
    )
    x.add_argument(
        "-e",
        "--exclude-regex",
        dest="exclude_regexes",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave out modules matching REGEX; may be repeated",
    )
    x.add_argument(
        "--sv-epsilon",
        type=float,
        default=0.0,
        help="drop singular values at or below this (default 0: keep --rank of them)",
    )
    x.add_argument(
        "--skip-undecomposable",
        action="store_true",
        help="leave out weights that are not linear layers (norms) instead of saving them whole",
    )
    x.add_argument(
        "--force", action="store_true", help="replace OUTPUT_DIR when it holds an adapter"
    )
    _everywhere_options(x, top_level=False)
