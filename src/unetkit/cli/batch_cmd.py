"""unetkit batch PLAN.toml|PLAN.jsonl [--engine local|ray]; unetkit batch DIR --glob PAT --job SPEC... -o OUT."""

from __future__ import annotations

import argparse
from pathlib import Path

from unetkit.cli.common import emit_json, progress_bar, table
from unetkit.errors import UnetkitError

HELP = "run many jobs over many models (convert, quantize, verify), resumable, locally or on a Ray cluster"
DESCRIPTION = """Run a plan: every input times every job, each job one verb with its options. Outputs are named by a
template and record, in their metadata, the source's sha256, the job and the unetkit version: a second run skips
what is up to date, so a batch killed at any point is finished by starting it again. A bad input or a failing job
is a failed row with its error; every other job still runs, and the exit code is 1 when anything failed.
Every finished job is appended to a ledger (JSONL: input, source sha256, job, output, size, wall time, peak RSS,
SQNR where verified, status, error); the summary is printed and written as an HTML page.

plan (TOML; paths relative to the plan file):
  inputs = ["models/*.safetensors"]      # globs, files or folders
  output_dir = "out"
  [[jobs]]
  verb = "convert"                       # to = diffusers | ldm; dtype = keep | fp16 | bf16 | fp32; prefix
  to = "diffusers"
  [[jobs]]
  verb = "quantize"                      # method = gguf:<recipe> | gguf:auto | torchao:<scheme> | quanto:<qtype>
  method = "gguf:Q8_0"                   # flavor, keep, override; include, exclude; target_size | _bpw | _sqnr
  [[jobs]]
  verb = "verify"                        # verify --quick of another job's output against its source
  of = "Q8_0"                            # the job's name (default: its recipe, e.g. Q8_0, or diffusers, ldm-fp16)
Each job takes name = "..." and output = "{stem}-{name}.gguf" (fields: stem, name, verb, input_dir).
JSONL: one object per line: a line with "verb" is a job, any other sets plan keys.

engines:
  local  worker processes (one per core unless --workers), each importing torch once; a job starts only when its
         estimated peak memory fits what the running jobs leave of --memory (default 90 % of available memory)
  ray    Ray tasks with CPU and memory requests, retried when a worker dies; no --address starts a local Ray,
         --address auto|ray://host:port joins a cluster (every node must see the inputs and output_dir at the same
         paths). Needs pip install 'unetkit[ray]'."""
EPILOG = """examples:
  unetkit batch catalog.toml
  unetkit batch catalog.toml --engine ray --address auto --json > result.json
  unetkit batch models/ --glob '*.safetensors' --job quantize:gguf:Q8_0 --job verify:Q8_0 -o out/
  unetkit batch models/ --glob '*.ckpt' --job convert:diffusers --job convert:ldm:fp16 -o out/ --dry-run
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help=HELP, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("plan", help="a .toml or .jsonl plan, or a folder (with --glob and --job)")
    p.add_argument("--glob", metavar="PAT", help="with a folder: which files are inputs (e.g. '*.safetensors')")
    p.add_argument(
        "--job",
        action="append",
        default=[],
        metavar="SPEC",
        help="with a folder: convert:diffusers, convert:ldm[:fp16], quantize:<method>, verify:<job name>; repeatable",
    )
    p.add_argument("-o", "--output-dir", metavar="DIR", help="where outputs go (overrides the plan's output_dir)")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="where jobs run (default local)")
    p.add_argument("--address", metavar="ADDR", help="ray: a cluster to join (auto, ray://host:port)")
    p.add_argument("--workers", type=int, metavar="N", help="local: processes; ray without --address: CPUs")
    p.add_argument("--memory", metavar="SIZE", help="local: memory budget for running jobs, e.g. 16GiB")
    p.add_argument("--force", action="store_true", help="replace outputs that exist but were not made by this job")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and their outputs; run nothing")
    p.add_argument("--html", metavar="FILE", help="the summary page (default: batch.html beside the ledger)")
    p.add_argument("--json", action="store_true", help="print the result (every row) as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unetkit.batch import load_plan, run_batch, shortcut_plan
    from unetkit.batch.report import HEADER, check_page, summary_rows, write_html

    if Path(args.plan).is_dir():
        if not args.glob or not args.output_dir:
            raise UnetkitError(f"{args.plan} is a folder: give --glob PAT, --job SPEC (one or more) and -o DIR")
        plan = shortcut_plan(args.plan, args.glob, args.job, args.output_dir)
    else:
        if args.glob or args.job:
            raise UnetkitError("--glob and --job are for a folder of models; a plan file lists its inputs and jobs")
        plan = load_plan(args.plan, output_dir=args.output_dir)
    if args.workers is not None and args.workers < 1:
        raise UnetkitError(f"--workers {args.workers}: give 1 or more")
    memory = None
    if args.memory:
        from unetkit.sensitivity.target import parse_size

        memory = parse_size(args.memory)
    if args.dry_run:
        rows = [[Path(t.input).name, t.job.name, t.job.verb, t.output] for t in plan.tasks]
        if args.json:
            emit_json([{"id": t.id, "input": t.input, "job": t.job.name, "output": t.output} for t in plan.tasks])
        else:
            print(table(rows, ["input", "job", "verb", "output"]))
            print(f"{len(plan.tasks)} jobs on {len(plan.inputs)} inputs; ledger {plan.ledger}")
            for n in plan.notes:
                print(f"note: {n}")
        return 0
    html_path = Path(args.html) if args.html else plan.ledger.parent / "batch.html"
    check_page(html_path, args.force)
    progress, close = _bar(len(plan.tasks), not args.json and not args.quiet)
    try:
        result = run_batch(
            plan,
            engine=args.engine,
            workers=args.workers,
            memory=memory,
            address=args.address,
            force=args.force,
            progress=progress,
        )
    finally:
        close()
    d = result.to_dict()
    write_html(d, html_path, force=args.force)
    if args.json:
        emit_json({**d, "html": str(html_path)})
    else:
        print(table(summary_rows(result.rows), HEADER))
        print(
            f"{d['done']} done, {d['skipped']} skipped, {d['failed']} failed in {d['seconds']:.1f} s "
            f"({d['engine']}, {d['workers']} workers)"
        )
        for n in d["notes"]:
            print(f"note: {n}")
        print(f"ledger {result.ledger}; summary {html_path}")
    return 1 if result.failed else 0


def _bar(tasks: int, enabled: bool):
    """Overall progress over the jobs' estimated work (so the ETA weighs a big model's jobs more), on stderr."""
    draw, close = progress_bar("batch", enabled, percent=True)
    seen = {"done": 0, "failed": 0}

    def progress(done: float, total: float, row) -> None:
        if row is not None:
            seen["done"] += 1
            seen["failed"] += row["status"] == "failed"
        draw(round(done, 3), round(total, 3), f"{seen['done']}/{tasks} jobs, {seen['failed']} failed")

    return progress, close
