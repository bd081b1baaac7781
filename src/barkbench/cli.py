"""Command line: thin subcommands over the package. Bad arguments -> one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from . import jobs, models, variants
from .jobwrap import positive_int as _positive
from .protocol import Protocol


class UsageError(Exception):
    pass


EACH_COMMANDS = ("run", "fidelity")  # what `barkbench each` runs in one process


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump
        raise UsageError(message)


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """One option per Protocol field (--min-iterations, --budget-s, ...), built from the dataclass:
    do_sample is --greedy, prompts the repeatable --prompt. Values are checked by Protocol itself."""
    for f in dataclasses.fields(Protocol):
        schema, flag = f.metadata["schema"], f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if schema["type"] == "boolean":  # a flag that flips the default
            p.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                           help=f.metadata["help"])
        elif schema["type"] == "array":  # repeatable; None: the field's default
            p.add_argument(flag, dest=f.name, action="append", metavar="TEXT", help=f.metadata["help"])
        else:
            p.add_argument(flag, dest=f.name, default=f.default, choices=schema.get("enum"),
                           type={"integer": int, "number": float, "string": str}[schema["type"]],
                           help=f"{f.metadata['help']} (default: %(default)s)")


def protocol_from(args) -> Protocol:
    """The Protocol of parsed options (ValueError, naming the option, for a bad value)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Protocol)}
    return Protocol(**{name: value for name, value in values.items() if value is not None})


def _check_out(path: str) -> None:
    """Refuse an output path that cannot be written before anything is measured."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"--out {path!r} is a folder; give the result JSON's path")
    folder = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--out {path!r}: {folder} is not writable")


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
    run.add_argument("--retry-of", default=None, help=argparse.SUPPRESS)  # the workflow re-attempting a failed run
    run.add_argument("--job-shell-pid", type=int, default=None, help=argparse.SUPPRESS)  # the workflow's job ($$)
    add_protocol_args(run)

    probe = sub.add_parser("probe", help="time a job's start, a model load and one call here; print them as JSON "
                                         "(the run's estimate, barkbench.estimate)")
    probe.add_argument("--model", required=True)
    probe.add_argument("--variant", default="eager")
    probe.add_argument("--device", default="auto")
    probe.add_argument("--offline-fallback", choices=["synthetic"], default=None)
    probe.add_argument("--threads", type=_positive("threads"), default=None)
    probe.add_argument("--config-hash", default=None, help=argparse.SUPPRESS)  # a run's arguments, as they are
    probe.add_argument("--start-only", action="store_true", help="a job's start only (imports, CPU calibration)")
    add_protocol_args(probe)

    hw = sub.add_parser("hardware", help="print this machine's hardware id and device type as JSON")
    hw.add_argument("--device", default="auto")

    build = sub.add_parser("build-synthetic", help="build (once) a synthetic checkpoint offline")
    build.add_argument("architecture", choices=list(models.ARCHITECTURES))

    env = sub.add_parser("legacy-env", help="build (once) the 2023 stack's virtual environment; describe it as JSON")
    env.add_argument("--requirements", required=True, help="pins of the stack (envs/legacy-requirements.txt)")
    env.add_argument("--out", required=True, help="JSON describing the environment (interpreter, installed packages)")
    env.add_argument("--root", default=None, help="folder of the environments (default: the barkbench cache)")

    agg = sub.add_parser("aggregate", help="tables and the report's text from exactly the given result files")
    agg.add_argument("--results-dir", required=True, help="the results folder the files lie in (<hardware>/...)")
    agg.add_argument("--baseline", required=True, help="variant every relative number compares with")
    agg.add_argument("--runs", nargs="+", required=True, metavar="JSON")
    agg.add_argument("--fidelity", nargs="*", default=[], metavar="JSON")
    agg.add_argument("--repro", nargs="*", default=[], metavar="JSON")
    agg.add_argument("--overhead", nargs="*", default=[], metavar="JSON")
    agg.add_argument("--faults", nargs="*", default=[], metavar="JSON", help="fault-suite records (barkbench.faults)")
    agg.add_argument("--config", default=None, help="the effective config, shown in the report")
    agg.add_argument("--reference", default=None, help="the 2023 study's published figures (CSV)")
    agg.add_argument("--out-dir", required=True)

    fig = sub.add_parser("figures", help="figures (and their Markdown) from the tables of `aggregate`")
    fig.add_argument("--runs", required=True, help="runs.csv")
    fig.add_argument("--fidelity", default=None, help="fidelity.csv")
    fig.add_argument("--out-dir", required=True)

    fid = sub.add_parser("fidelity", help="compare a variant with the baseline variant on the same inputs")
    fid.add_argument("--model", required=True)
    fid.add_argument("--variant", required=True)
    fid.add_argument("--baseline", default="eager", help="variant to compare with (default: eager fp32)")
    fid.add_argument("--out", required=True)
    fid.add_argument("--device", default="auto")
    fid.add_argument("--offline-fallback", choices=["synthetic"], default=None)
    fid.add_argument("--tokens", type=_positive("tokens"), default=32, help="greedy semantic tokens compared")
    fid.add_argument("--time-limit-s", type=float, default=None, help="stop the check there (recorded as failed)")
    fid.add_argument("--threads", type=_positive("threads"), default=None,
                     help="torch intra-op threads (default: all physical cores, whatever OMP_NUM_THREADS says)")
    fid.add_argument("--retry-of", default=None, help=argparse.SUPPRESS)
    fid.add_argument("--cost-targets", default=None, metavar="JSON",
                     help="targets of each number format's cost, written before the run: "
                          '{"int8-dynamic": {"kl_mean": 0.01, "same_top1": 0.9, "source": "..."}} (judged on hub weights only)')
    fid.add_argument("--job-shell-pid", type=int, default=None, help=argparse.SUPPRESS)

    each = sub.add_parser("each", help="run several `run` / `fidelity` commands in this one process (the workflow "
                                       "records the variants that cannot run on this device in one job)")
    each.add_argument("commands", help='JSON list of argument lists: [["run", "--variant", ...], ["fidelity", ...]]')
    each.add_argument("--job-shell-pid", type=int, default=None, help=argparse.SUPPRESS)

    rep = sub.add_parser("render", help="render the report from the tables' fragments and the figures")
    rep.add_argument("--qmd", required=True)
    rep.add_argument("--tables", required=True, help="folder written by `aggregate`")
    rep.add_argument("--figures", required=True, help="folder written by `figures`")
    rep.add_argument("--out", required=True)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "job_shell_pid", None) is not None:  # dies with the job's shell, writes only while it lives
            jobs.tie_to_shell(args.job_shell_pid)
        if args.command == "run":
            protocol = protocol_from(args)
            variants.parse(args.variant)
            if not (args.model in models.known_models() or __import__("os").path.isdir(args.model)):
                raise UsageError(f"unknown model {args.model!r}; known: {', '.join(models.known_models())}")
            _check_out(args.out)
            from .runner import RunRequest, run

            result = run(RunRequest(args.model, args.variant, protocol, device=args.device,
                                    offline_fallback=args.offline_fallback, instrument_stages=not args.no_stage_timing,
                                    config_hash=args.config_hash, fail_with=args.fail_with, threads=args.threads,
                                    retry_of=args.retry_of), args.out)
            detail = f"median {result.summary.latency_s.median:.3f} s" if result.summary else result.reason
            print(f"{args.variant} bs{protocol.batch_size}: {result.status} ({detail})", file=sys.stderr)
            return 0
        if args.command == "probe":
            import json

            from .estimate import measure_probe
            from .jobwrap import quiet_transformers, use_threads
            from .runner import RunRequest

            quiet_transformers()
            use_threads(args.threads)
            req = RunRequest(args.model, args.variant, protocol_from(args), device=args.device,
                             offline_fallback=args.offline_fallback)
            print(json.dumps(measure_probe(req, start_only=args.start_only)))
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
        if args.command == "legacy-env":
            import json

            from .legacy import build_env
            from .results import write_atomic

            _check_out(args.out)
            if not __import__("os").path.isfile(args.requirements):
                raise UsageError(f"no requirements file {args.requirements!r}")
            described = build_env(args.requirements, args.root)
            write_atomic(args.out, (json.dumps(described, indent=1) + "\n").encode())
            print(f"legacy environment {described['env']} ({'built' if described['built_now'] else 'reused'}, "
                  f"{described['seconds']:.0f} s)", file=sys.stderr)
            return 0
        if args.command == "aggregate":
            from .aggregate import aggregate

            aggregate(args.results_dir, args.out_dir, args.baseline, args.runs, args.fidelity, args.repro,
                      args.overhead, config=args.config, reference=args.reference, faults=args.faults)
            return 0
        if args.command == "figures":
            from .figures import make_figures

            make_figures(args.runs, args.out_dir, args.fidelity)
            return 0
        if args.command == "fidelity":
            from .fidelity import run_fidelity

            from .fidelity import parse_cost_targets

            variants.parse(args.baseline)
            targets = parse_cost_targets(args.cost_targets) if args.cost_targets else None
            run_fidelity(args.model, args.variant, args.out, args.device, args.offline_fallback, args.tokens,
                         baseline=args.baseline, retry_of=args.retry_of, cost_targets=targets,
                         time_limit_s=args.time_limit_s, threads=args.threads)
            return 0
        if args.command == "each":
            import json

            commands = json.loads(args.commands)
            if not (isinstance(commands, list) and all(
                    isinstance(c, list) and c and c[0] in EACH_COMMANDS and all(isinstance(a, str) for a in c)
                    for c in commands)):
                raise UsageError(f"each: give a JSON list of argument lists, each starting with one of {EACH_COMMANDS}")
            return max((main(command) for command in commands), default=0)  # each one writes its own record
        if args.command == "render":
            from .render import render_report

            render_report(args.qmd, args.tables, args.figures, args.out)
            return 0
    except (UsageError, variants.VariantError, models.ModelSourceError, ValueError, OSError) as exc:
        print(f"barkbench: error: {exc}", file=sys.stderr)
        return 2
    except jobs.ShellGone as exc:
        print(f"barkbench: {exc}", file=sys.stderr)
        return 1
    return 1
