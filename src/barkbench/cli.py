"""Command line: thin subcommands over the package. Bad arguments -> one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import sys

from . import models, variants
from .protocol import DEFAULT_PROMPTS, Protocol


class UsageError(Exception):
    pass


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer (got {text!r})")
        if value < (0 if name == "warmup" else 1):
            raise argparse.ArgumentTypeError(f"{name} must be >= {0 if name == 'warmup' else 1} (got {value})")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump
        raise UsageError(message)


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    d = Protocol()
    p.add_argument("--batch-size", type=_positive("batch-size"), default=d.batch_size)
    p.add_argument("--iterations", type=_positive("iterations"), default=d.iterations)
    p.add_argument("--warmup", type=_positive("warmup"), default=d.warmup, help="untimed calls first")
    p.add_argument("--max-new-tokens", type=_positive("max-new-tokens"), default=d.max_new_tokens,
                   help="semantic tokens per call")
    p.add_argument("--length-mode", choices=["fixed", "natural"], default=d.length_mode,
                   help="fixed: suppress the semantic EOS so every call decodes max-new-tokens")
    p.add_argument("--greedy", action="store_true", help="do_sample=False (default samples, as in 2023)")
    p.add_argument("--fine-temperature", type=float, default=d.fine_temperature)
    p.add_argument("--coarse-temperature", type=float, default=d.coarse_temperature)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="repeatable; a batch cycles through them (default: the 2023 study's prompts)")


def protocol_from(args) -> Protocol:
    return Protocol(warmup=args.warmup, iterations=args.iterations, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, length_mode=args.length_mode, do_sample=not args.greedy,
                    fine_temperature=args.fine_temperature, coarse_temperature=args.coarse_temperature,
                    seed=args.seed, prompts=args.prompts or list(DEFAULT_PROMPTS))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="barkbench", description="Benchmark Bark TTS inference optimizations.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="benchmark one model x variant x batch size; write one JSON")
    run.add_argument("--model", required=True, help=f"one of {', '.join(models.known_models())} or a local folder")
    run.add_argument("--variant", required=True, help=f"'+'-joined optimizations: {', '.join(variants.REGISTRY)}")
    run.add_argument("--out", required=True, help="result JSON path (the WAV sample goes beside it)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    run.add_argument("--offline-fallback", choices=["synthetic"], default=None,
                     help="run the synthetic architecture when a hub id is neither reachable nor cached")
    run.add_argument("--threads", type=_positive("threads"), default=None,
                     help="torch intra-op threads (default: all physical cores, whatever OMP_NUM_THREADS says)")
    run.add_argument("--no-stage-timing", action="store_true", help="plain run without per-stage timers")
    run.add_argument("--config-hash", default=None, help=argparse.SUPPRESS)
    run.add_argument("--fail-with", default=None, help=argparse.SUPPRESS)
    add_protocol_args(run)

    hw = sub.add_parser("hardware", help="print this machine's hardware id and device type as JSON")
    hw.add_argument("--device", default="auto")

    build = sub.add_parser("build-synthetic", help="build (once) a synthetic checkpoint offline")
    build.add_argument("architecture", choices=list(models.ARCHITECTURES))

    agg = sub.add_parser("aggregate", help="tables from run JSONs")
    agg.add_argument("runs", nargs="+")
    agg.add_argument("--out-dir", required=True)

    fig = sub.add_parser("figures", help="figures from the tidy runs table")
    fig.add_argument("--runs-csv", required=True)
    fig.add_argument("--fidelity", nargs="*", default=[])
    fig.add_argument("--out-dir", required=True)

    fid = sub.add_parser("fidelity", help="compare a variant with eager fp32 on the same inputs")
    fid.add_argument("--model", required=True)
    fid.add_argument("--variant", required=True)
    fid.add_argument("--out", required=True)
    fid.add_argument("--device", default="auto")
    fid.add_argument("--offline-fallback", choices=["synthetic"], default=None)
    fid.add_argument("--tokens", type=_positive("tokens"), default=32, help="greedy semantic tokens compared")

    rep = sub.add_parser("render", help="render the report")
    rep.add_argument("--qmd", required=True)
    rep.add_argument("--results-dir", required=True)
    rep.add_argument("--out", required=True)
    rep.add_argument("--config", default=None)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "run":
            protocol = protocol_from(args)
            variants.parse(args.variant)
            if not (args.model in models.known_models() or __import__("os").path.isdir(args.model)):
                raise UsageError(f"unknown model {args.model!r}; known: {', '.join(models.known_models())}")
            from .runner import RunRequest, run

            result = run(RunRequest(args.model, args.variant, protocol, args.device, args.offline_fallback,
                                    not args.no_stage_timing, args.config_hash, args.fail_with, args.threads), args.out)
            summary = result["summary"]
            detail = (f"median {summary['latency_s']['median']:.3f} s" if summary else result["reason"])
            print(f"{args.variant} bs{protocol.batch_size}: {result['status']} ({detail})", file=sys.stderr)
            return 0
        if args.command == "hardware":
            import json

            from .provenance import hardware_id, resolve_device

            device = resolve_device(args.device)
            print(json.dumps({"id": hardware_id(device), "device": device.type}))
            return 0
        if args.command == "build-synthetic":
            print(models.build_synthetic(args.architecture))
            return 0
        if args.command == "aggregate":
            from .aggregate import aggregate

            aggregate(args.runs, args.out_dir)
            return 0
        if args.command == "figures":
            from .figures import make_figures

            make_figures(args.runs_csv, args.out_dir, args.fidelity)
            return 0
        if args.command == "fidelity":
            from .fidelity import run_fidelity

            run_fidelity(args.model, args.variant, args.out, args.device, args.offline_fallback, args.tokens)
            return 0
        if args.command == "render":
            from .render import render_report

            render_report(args.qmd, args.results_dir, args.out, config=args.config)
            return 0
    except (UsageError, variants.VariantError, models.ModelSourceError, ValueError) as exc:
        print(f"barkbench: error: {exc}", file=sys.stderr)
        return 2
    return 1
