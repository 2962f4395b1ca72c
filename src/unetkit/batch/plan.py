"""A batch plan: inputs x jobs, checked whole before anything runs, expanded into tasks with their output paths.

The plan file is TOML or JSONL (paths in it are relative to its own folder)::

    inputs = ["models/*.safetensors"]      # globs, files or folders
    output_dir = "out"
    [[jobs]]
    verb = "convert"
    to = "diffusers"
    [[jobs]]
    verb = "quantize"
    method = "gguf:Q8_0"
    [[jobs]]
    verb = "verify"                        # verify --quick of another job's output against its source
    of = "Q8_0"

JSONL: one object per line; a line with ``verb`` is a job, any other line sets the plan's keys (``inputs``,
``output_dir``, ``ledger``, ``output``). A job may carry ``inputs`` of its own (it then runs on those only).

Each job names its output with a template (``output``; defaults in :data:`DEFAULT_OUTPUT`) over ``{stem}`` (the
input's name without its suffix), ``{name}`` (the job's name, default from its options: ``diffusers``,
``Q8_0``, ``int8-weight-only``, ``verify-Q8_0``), ``{verb}`` and ``{input_dir}`` (the input's folder name).
Every option is checked here, with errors that name the plan file and the job; two tasks that would write the same
output are an error that names both inputs.
"""

from __future__ import annotations

import glob
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unetkit.errors import UnetkitError

VERBS = ("convert", "quantize", "verify")
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
PLAN_KEYS = {"inputs", "output_dir", "ledger", "jobs"}
#: every option a job of each verb takes, with its default (None: required, or unset)
OPTIONS: dict[str, dict[str, Any]] = {
    "convert": {"to": None, "dtype": "keep", "prefix": True, "ema": False},
    "quantize": {
        "method": None,
        "flavor": "comfy",
        "keep": [],
        "override": [],
        "include": None,
        "exclude": None,
        "ema": False,
        "target_size": None,
        "target_bpw": None,
        "target_sqnr": None,
        "measure": True,
    },
    "verify": {"of": None, "quick": True, "size": None, "timesteps": None, "min_sqnr": None, "blame": False},
}
COMMON = {"verb", "name", "output", "inputs"}
TEMPLATE_FIELDS = {"stem", "name", "verb", "input_dir"}


class PlanError(UnetkitError):
    """A plan that cannot run as written: the message names the plan file and the entry."""


@dataclass(frozen=True)
class Job:
    """One verb with its options (defaults filled in), under a name unique in the plan."""

    name: str
    verb: str
    options: dict[str, Any]
    output: str  # the template
    inputs: tuple[str, ...] | None = None  # patterns of its own (relative to the plan's folder), or None: the plan's

    def stamp(self) -> str:
        """What an output made by this job records (``unetkit.batch_job``): the verb and its options, canonical."""
        return json.dumps({"verb": self.verb, **self.options}, sort_keys=True, separators=(",", ":"))

    @property
    def method(self) -> str:
        return str(self.options.get("method") or "")

    @property
    def writes_folder(self) -> bool:
        if self.verb == "convert":
            return self.options["to"] == "diffusers"
        return self.verb == "quantize" and not self.method.lower().startswith("gguf:")


@dataclass(frozen=True)
class Task:
    """One job on one input: what a worker runs. Plain data, so that it pickles for any engine."""

    id: str  # "<input>::<job name>", unique
    input: str  # absolute path
    job: Job
    output: str  # absolute path
    depends: str | None = None  # the id of the task whose output this one verifies

    @property
    def stem(self) -> str:
        return _stem(Path(self.input))


@dataclass
class Plan:
    source: str  # the plan file, or "DIR --glob PAT" for the shortcut
    inputs: list[str]  # absolute paths, in order
    output_dir: Path
    ledger: Path
    jobs: list[Job]
    tasks: list[Task] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. a pattern that matched nothing


def load_plan(path: str | Path, *, output_dir: str | Path | None = None) -> Plan:
    """Read a TOML or JSONL plan and expand it (see the module docstring). ``output_dir`` overrides the plan's."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such plan file (a .toml or .jsonl plan; or a folder with --glob and --job)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: cannot read the plan: {e}") from e
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        raw = _parse_jsonl(path, text)
    else:
        raw = _parse_toml(path, text)
    base = path.parent
    unknown = sorted(set(raw) - PLAN_KEYS)
    if unknown:
        raise PlanError(f"{path}: unknown plan key(s) {unknown}; a plan has {sorted(PLAN_KEYS)}")
    inputs = raw.get("inputs", [])
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise PlanError(f"{path}: 'inputs' must be a list of globs, files or folders, got {inputs!r}")
    out = output_dir if output_dir is not None else raw.get("output_dir")
    if not isinstance(out, (str, Path)):
        raise PlanError(f"{path}: 'output_dir' is missing (where the outputs go), or pass --output-dir")
    jobs_raw = raw.get("jobs", [])
    if not isinstance(jobs_raw, list) or not jobs_raw:
        raise PlanError(f"{path}: the plan has no jobs; add [[jobs]] tables with verb = {' | '.join(VERBS)}")
    out_dir = (base / out).resolve() if output_dir is None else Path(out).resolve()
    ledger = raw.get("ledger")
    if ledger is not None and not isinstance(ledger, str):
        raise PlanError(f"{path}: 'ledger' must be a path, got {ledger!r}")
    jobs = [parse_job(j, f"{path}: job {i + 1}") for i, j in enumerate(jobs_raw)]
    return expand(
        str(path),
        base,
        [str(i) for i in inputs],
        out_dir,
        jobs,
        ledger=(base / ledger).resolve() if ledger else None,
    )


def shortcut_plan(folder: str | Path, pattern: str, jobs: list[str], output_dir: str | Path) -> Plan:
    """``unetkit batch DIR --glob PAT --job SPEC...``: the plan of every file in DIR matching PAT times the jobs.
    SPEC: ``convert:diffusers``, ``convert:ldm``, ``convert:ldm:fp16``, ``quantize:<method>`` (e.g.
    ``quantize:gguf:Q8_0``, ``quantize:torchao:int8-weight-only``), ``verify:<job name>``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PlanError(f"{folder}: not a folder (give a plan file, or a folder with --glob)")
    if not jobs:
        raise PlanError("no --job given; e.g. --job quantize:gguf:Q8_0 --job convert:diffusers --job verify:Q8_0")
    parsed = [parse_job(job_from_spec(s), f"--job {s}") for s in jobs]
    where = f"{folder} --glob {pattern}"
    return expand(where, folder, [pattern], Path(output_dir).resolve(), parsed, ledger=None)


def job_from_spec(spec: str) -> dict[str, Any]:
    verb, _, rest = spec.partition(":")
    if verb == "convert":
        to, _, dtype = rest.partition(":")
        return {"verb": verb, "to": to, **({"dtype": dtype} if dtype else {})}
    if verb == "quantize":
        return {"verb": verb, "method": rest}
    if verb == "verify":
        return {"verb": verb, "of": rest}
    raise PlanError(f"--job {spec}: expected convert:<to>[:<dtype>], quantize:<method> or verify:<job name>")


def parse_job(raw: Any, where: str) -> Job:
    """Check one job's verb and options (known names, types, allowed values) and fill in the defaults."""
    from unetkit.quant.gguf.policy import FLAVORS, GGUF_METHOD, RECIPES

    if not isinstance(raw, dict):
        raise PlanError(f"{where}: a job is a table of options, got {raw!r}")
    verb = raw.get("verb")
    if verb not in VERBS:
        raise PlanError(f"{where}: verb {verb!r}; expected one of {', '.join(VERBS)}")
    known = OPTIONS[verb]
    unknown = sorted(set(raw) - set(known) - COMMON)
    if unknown:
        raise PlanError(f"{where}: unknown option(s) {unknown} for {verb}; it takes {sorted(set(known) | COMMON)}")
    opts = {k: raw.get(k, v) for k, v in known.items()}
    for k, v in opts.items():
        if v is None:
            continue
        if k in ("prefix", "ema", "measure", "quick", "blame") and not isinstance(v, bool):
            raise PlanError(f"{where}: {k} must be true or false, got {v!r}")
        if k in ("keep", "override", "include", "exclude") and (
            not isinstance(v, list) or not all(isinstance(x, str) for x in v)
        ):
            raise PlanError(f"{where}: {k} must be a list of strings, got {v!r}")
        if k in ("target_bpw", "target_sqnr", "min_sqnr") and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise PlanError(f"{where}: {k} must be a number, got {v!r}")
        if k in ("size", "timesteps") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise PlanError(f"{where}: {k} must be a positive integer, got {v!r}")
    if verb == "convert":
        if opts["to"] not in ("diffusers", "ldm"):
            raise PlanError(f"{where}: convert needs to = 'diffusers' or 'ldm', got {opts['to']!r}")
        if opts["dtype"] not in ("keep", "fp32", "fp16", "bf16"):
            raise PlanError(f"{where}: dtype {opts['dtype']!r}; expected keep, fp32, fp16 or bf16")
        name = opts["to"] + ("" if opts["dtype"] == "keep" else f"-{opts['dtype']}")
        name += "" if opts["prefix"] or opts["to"] != "ldm" else "-noprefix"
    elif verb == "quantize":
        method = opts["method"]
        if not isinstance(method, str) or ":" not in method:
            raise PlanError(f"{where}: quantize needs method = 'gguf:<recipe>', 'torchao:<scheme>' or 'quanto:<qtype>'")
        kind, _, recipe = method.partition(":")
        targets = [t for t in ("target_size", "target_bpw", "target_sqnr") if opts[t] is not None]
        if method.lower().startswith(GGUF_METHOD):
            if recipe.lower() == "auto":
                if len(targets) != 1:
                    raise PlanError(f"{where}: gguf:auto needs exactly one of target_size, target_bpw, target_sqnr")
            elif recipe.upper() not in RECIPES:
                raise PlanError(f"{where}: unknown GGUF recipe {recipe!r}; known: {', '.join(RECIPES)}, auto")
            elif targets:
                raise PlanError(f"{where}: {targets} are for gguf:auto, not {method}")
            if opts["flavor"] not in FLAVORS:
                raise PlanError(f"{where}: flavor {opts['flavor']!r}; expected one of {', '.join(FLAVORS)}")
            if opts["include"] or opts["exclude"]:
                raise PlanError(f"{where}: include/exclude are for torchao:/quanto: methods; GGUF uses keep/override")
        else:
            if kind not in ("torchao", "quanto"):
                raise PlanError(f"{where}: method {method!r}; expected gguf:, torchao: or quanto:")
            if opts["keep"] or opts["override"] or opts["flavor"] != "comfy" or targets:
                raise PlanError(f"{where}: keep/override/flavor/target_* are for gguf: methods, not {method}")
        if isinstance(opts["target_size"], int) and not isinstance(opts["target_size"], bool):
            opts["target_size"] = str(opts["target_size"])
        if opts["target_size"] is not None and not isinstance(opts["target_size"], str):
            raise PlanError(f"{where}: target_size must be a size such as '600MiB', got {opts['target_size']!r}")
        name = recipe
        if recipe.lower() == "auto":
            t = targets[0]
            name = f"auto-{t.split('_')[1]}{opts[t]}"
        if opts["flavor"] != "comfy":
            name += f"-{opts['flavor']}"
    else:
        if not isinstance(opts["of"], str) or not opts["of"]:
            raise PlanError(f"{where}: verify needs of = '<the name of the job whose output it checks>'")
        name = f"verify-{opts['of']}"
    name = raw.get("name", name)
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise PlanError(f"{where}: name {name!r} must be a non-empty file-name-safe string")
    template = raw.get("output", DEFAULT_OUTPUT[_kind(verb, opts)])
    _check_template(template, where)
    own = raw.get("inputs")
    if own is not None:
        own = [own] if isinstance(own, str) else own
        if not isinstance(own, list) or not all(isinstance(i, str) for i in own):
            raise PlanError(f"{where}: inputs must be a list of globs, files or folders, got {own!r}")
        own = tuple(own)
    return Job(name=name, verb=verb, options=opts, output=template, inputs=own)


#: the output template of each kind of job
DEFAULT_OUTPUT = {
    "folder": "{stem}-{name}",
    "safetensors": "{stem}-{name}.safetensors",
    "gguf": "{stem}-{name}.gguf",
    "report": "{stem}-{name}.json",
}


def _kind(verb: str, opts: dict[str, Any]) -> str:
    if verb == "convert":
        return "folder" if opts["to"] == "diffusers" else "safetensors"
    if verb == "quantize":
        return "gguf" if str(opts["method"]).lower().startswith("gguf:") else "folder"
    return "report"


def _check_template(template: Any, where: str) -> None:
    if not isinstance(template, str) or not template:
        raise PlanError(f"{where}: output must be a template such as '{{stem}}-{{name}}.gguf', got {template!r}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise PlanError(f"{where}: output template {template!r}: {e}") from e
    bad = sorted(fields - TEMPLATE_FIELDS)
    if bad:
        raise PlanError(f"{where}: output template {template!r} uses {bad}; it may use {sorted(TEMPLATE_FIELDS)}")
    if Path(template).is_absolute() or ".." in Path(template).parts:
        raise PlanError(f"{where}: output template {template!r} must stay inside output_dir (relative, no '..')")


def expand(where: str, base: Path, patterns: list[str], out_dir: Path, jobs: list[Job], ledger: Path | None) -> Plan:
    """Inputs x jobs -> tasks, in input order then job order; every name and output checked."""
    names: dict[str, Job] = {}
    for job in jobs:
        if job.name in names:
            raise PlanError(f"{where}: two jobs are named {job.name!r}; give one of them another name = '...'")
        names[job.name] = job
    for job in jobs:
        if job.verb == "verify":
            of = names.get(job.options["of"])
            if of is None or of.verb == "verify":
                known = [n for n, j in names.items() if j.verb != "verify"]
                raise PlanError(
                    f"{where}: job {job.name!r} verifies {job.options['of']!r}, which is not a convert or "
                    f"quantize job of this plan (its jobs: {known})"
                )
    notes: list[str] = []
    plan_inputs = _inputs(base, patterns, notes)
    runs_on = {j.name: plan_inputs if j.inputs is None else _inputs(base, list(j.inputs), notes) for j in jobs}
    for job in jobs:  # a verify job runs where the job it checks ran
        if job.verb == "verify":
            runs_on[job.name] = [i for i in runs_on[job.name] if i in set(runs_on[job.options["of"]])]
    order = list(dict.fromkeys(i for job in jobs for i in runs_on[job.name]))
    tasks: list[Task] = []
    by_output: dict[str, Task] = {}
    for inp in order:
        for job in jobs:
            if inp not in runs_on[job.name]:
                continue
            depends = f"{inp}::{job.options['of']}" if job.verb == "verify" else None
            p = Path(inp)
            rel = job.output.format(stem=_stem(p), name=job.name, verb=job.verb, input_dir=p.parent.name)
            output = str((out_dir / rel).resolve())
            task = Task(id=f"{inp}::{job.name}", input=inp, job=job, output=output, depends=depends)
            if output in by_output:
                other = by_output[output]
                raise PlanError(
                    f"{where}: {other.input} ({other.job.name}) and {inp} ({job.name}) would both write {output}; "
                    "give the jobs output templates that tell them apart, e.g. '{input_dir}-{stem}-{name}.gguf'"
                )
            if Path(output) == Path(inp) or Path(inp).is_relative_to(Path(output)):
                raise PlanError(f"{where}: job {job.name!r} would write {output} over its input {inp}")
            by_output[output] = task
            tasks.append(task)
    if not tasks:
        raise PlanError(f"{where}: no input matched {patterns}; nothing to do")
    return Plan(
        source=where,
        inputs=order,
        output_dir=out_dir,
        ledger=ledger or out_dir / "ledger.jsonl",
        jobs=jobs,
        tasks=tasks,
        notes=notes,
    )


def _inputs(base: Path, patterns: list[str], notes: list[str]) -> list[str]:
    """Globs, files or folders -> absolute input paths, in pattern order, each once. A model folder (diffusers:
    config.json, model_index.json or unet/) is one input; any other folder stands for its model files."""
    found: list[str] = []
    for pat in patterns:
        p = Path(pat).expanduser()
        full = p if p.is_absolute() else base / p
        matches = sorted(glob.glob(str(full), recursive=True)) if glob.has_magic(str(full)) else [str(full)]
        hits: list[str] = []
        for m in matches:
            mp = Path(m)
            if mp.is_dir() and not _model_folder(mp):
                hits += [str(c) for c in sorted(mp.iterdir()) if c.is_file() and c.suffix.lower() in MODEL_SUFFIXES]
            elif mp.exists() or not glob.has_magic(str(full)):
                hits.append(m)
        if not hits:
            notes.append(f"inputs: {pat!r} matched nothing")
        for h in hits:
            a = str(Path(h).resolve()) if Path(h).exists() else str(Path(h).absolute())
            if a not in found:
                found.append(a)
    return found


def _model_folder(p: Path) -> bool:
    return (p / "config.json").is_file() or (p / "model_index.json").is_file() or (p / "unet").is_dir()


def _stem(p: Path) -> str:
    return p.name if p.is_dir() else p.stem


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path}: not valid TOML: {e}") from e


def _parse_jsonl(path: Path, text: str) -> dict[str, Any]:
    raw: dict[str, Any] = {"jobs": []}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise PlanError(f"{path}:{n}: not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise PlanError(f"{path}:{n}: each line is a JSON object (a job with 'verb', or plan keys)")
        if "verb" in obj:
            raw["jobs"].append(obj)
        else:
            for k, v in obj.items():
                if k == "jobs":
                    raise PlanError(f"{path}:{n}: in JSONL each job is a line of its own, not a 'jobs' list")
                raw[k] = v
    return raw
