"""The verify report: one object, written as JSON (schema ``unetkit.verify/1``, :data:`SCHEMA_PATH`) or HTML.

Top-level JSON fields (every float that would be infinite, i.e. an SQNR of identical tensors, is ``null``; the
``identical`` flags beside it say so):

* ``schema``, ``unetkit_version``, ``torch_version``, ``seconds``
* ``reference`` / ``candidate``: ``source``, ``variant``, ``dtype``, ``quantized``, ``parameters``
* ``settings``: timesteps, steps, scheduler, size, seed, batch, guidance, cfg, lcm_guidance_embedding,
  prediction_type, prediction_type_source (where it came from), exact_mode, min_sqnr_db, blame, prompt_embeds, vae,
  preset, device, compute_dtype (per side: fp16/bf16 weights are computed in float32, cast layer by layer),
  unet_calls
* ``exact``: null, or ``bit_identical``, ``tensors_compared``, ``first_tensor`` (name, reason, stats) and
  ``first_output`` (timestep, stats): the first weight and the first output that differ
* ``timesteps``: per timestep ``timestep``, ``sqnr_db``, ``cosine``, ``rel_l2``, ``max_abs``, ``identical``
  (the guided noise prediction)
* ``sampling``: ``scheduler``, ``steps``, ``per_step`` (step, timestep, stats of the latents) and ``final``
* ``images``: null, or the decoded images' ``psnr_db`` and stats (with ``--vae``)
* ``blame``: null, or ``timestep``, ``modules``, ``differing``, ``blamed``, ``blamed_block``,
  ``first_divergence``, ``ranking`` (top 20: module, type, block, order, call, local, propagated,
  input_sqnr_db, growth_db), ``blocks`` and ``layers`` (every leaf module's local and propagated SQNR in order)
* ``summary``: ``passed``, ``verdict`` (bit-identical | not bit-identical | passed | below threshold |
  measured), ``worst_sqnr_db``, ``reason``
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from unetkit._version import __version__
from unetkit.formats.atomic import atomic_output

SCHEMA = "unetkit.verify/1"
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


@dataclass
class Side:
    source: str
    variant: str
    dtype: str
    quantized: bool
    parameters: int


@dataclass
class Report:
    reference: Side
    candidate: Side
    settings: dict[str, Any]
    exact: dict[str, Any] | None = None
    timesteps: list[dict[str, Any]] = field(default_factory=list)
    sampling: dict[str, Any] | None = None
    images: dict[str, Any] | None = None
    blame: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # for the HTML page only (not in the JSON): final latents and decoded images, reference and candidate
    latents: tuple[torch.Tensor, torch.Tensor] | None = None
    image_pair: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def passed(self) -> bool:
        return bool(self.summary.get("passed"))

    @property
    def worst_sqnr_db(self) -> float:
        """The lowest SQNR over the timesteps and the final latents (inf when all are identical)."""
        values = [t["sqnr_db"] for t in self.timesteps if not t["identical"]]
        if self.sampling and not self.sampling["final"]["identical"]:
            values.append(self.sampling["final"]["sqnr_db"])
        values = [-math.inf if v is None else v for v in values]  # null on a non-identical row: no signal
        return min(values) if values else math.inf

    def finish(self, min_sqnr: float | None) -> None:
        worst = self.worst_sqnr_db
        if self.exact is not None:
            ok = bool(self.exact["bit_identical"])
            verdict = "bit-identical" if ok else "not bit-identical"
            if ok:
                reason = f"{self.exact['tensors_compared']} tensors and every output bit for bit equal"
            else:
                parts = []
                if self.exact["first_tensor"]:
                    ft = self.exact["first_tensor"]
                    parts.append(f"first differing tensor: {ft['name']} ({ft['reason']})")
                if self.exact["first_output"]:
                    parts.append(f"first differing output: timestep {self.exact['first_output']['timestep']}")
                reason = "; ".join(parts) or "outputs differ"
        elif min_sqnr is not None:
            ok = worst >= min_sqnr
            verdict = "passed" if ok else "below threshold"
            reason = f"worst SQNR {_fmt_db(worst)} {'>=' if ok else '<'} {min_sqnr:g} dB"
        else:
            ok, verdict = True, "measured"
            reason = f"worst SQNR {_fmt_db(worst)} (no threshold given)"
        if not ok and self.blame and self.blame.get("blamed"):
            reason += f"; blamed first: {self.blame['blamed']} ({self.blame['blamed_block']})"
        self.summary = {
            "passed": ok,
            "verdict": verdict,
            "worst_sqnr_db": None if math.isinf(worst) else worst,
            "reason": reason,
        }

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "schema": SCHEMA,
                "unetkit_version": __version__,
                "torch_version": torch.__version__,
                "seconds": round(self.seconds, 3),
                "reference": asdict(self.reference),
                "candidate": asdict(self.candidate),
                "settings": self.settings,
                "exact": self.exact,
                "timesteps": self.timesteps,
                "sampling": self.sampling,
                "images": self.images,
                "blame": self.blame,
                "summary": self.summary,
            }
        )

    def write_json(self, path: str | Path, force: bool = False) -> Path:
        path = Path(path)
        with atomic_output(path, force=force) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    def write_html(self, path: str | Path, force: bool = False) -> Path:
        from unetkit.verification.html import write_html

        return write_html([self], path, force=force)

    def text(self) -> str:
        """A few lines for a terminal."""
        s = self.settings
        computed = s.get("compute_dtype") or {}

        def held(side: Side, role: str) -> str:  # "float16, computed in float32" when they differ
            c = computed.get(role)
            return side.dtype + (f", computed in {c}" if c and c != side.dtype else "")

        lines = [
            f"reference {self.reference.source} ({self.reference.variant}, {held(self.reference, 'reference')})",
            f"candidate {self.candidate.source} ({held(self.candidate, 'candidate')}"
            f"{', quantized' if self.candidate.quantized else ''})",
            f"{s['timesteps']} timesteps, {s['steps']}-step {s['scheduler']} loop "
            f"({s['prediction_type']}, {s.get('prediction_type_source') or 'given'}), {s['size']}x{s['size']} "
            f"latents, batch {s['batch']}, guidance {s['guidance']:g}"
            f"{' (CFG)' if s['cfg'] else ' (LCM embedding)' if s['lcm_guidance_embedding'] else ''}, "
            f"seed {s['seed']}",
        ]
        if self.exact is not None:
            lines.append(
                f"  exact: {self.exact['tensors_compared']} tensors compared; "
                + (
                    "all bit-identical"
                    if not self.exact["first_tensor"]
                    else f"first differing tensor {self.exact['first_tensor']['name']}: "
                    f"{self.exact['first_tensor']['reason']}"
                )
            )
        for t in self.timesteps:
            lines.append(f"  t={t['timestep']:>4}: {_stats_text(t)}")
        if self.sampling:
            lines.append(
                f"  final latents after {self.sampling['steps']} {self.sampling['scheduler']} steps: "
                f"{_stats_text(self.sampling['final'])}"
            )
        if self.images:
            lines.append(f"  decoded images: PSNR {_fmt_db(self.images['psnr_db'])}")
        if self.blame and self.blame["ranking"]:
            lines.append(
                f"  blame (t={self.blame['timestep']}; {self.blame['differing']} of "
                f"{self.blame['modules']} modules differ on identical inputs), worst first:"
            )
            for e in self.blame["ranking"][:5]:
                lines.append(f"    {e['module']:<60} {e['type']:<12} local SQNR {_fmt_db(e['local']['sqnr_db'])}")
        elif self.blame:
            lines.append(f"  blame: all {self.blame['modules']} modules give identical outputs on identical inputs")
        lines.append(f"{self.summary['verdict'].upper()}: {self.summary['reason']}")
        return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """Non-finite floats become null (JSON has no inf/nan; the ``identical`` flags tell identical apart)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt_db(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isinf(v) and v > 0):
        return "inf dB"
    return f"{v:.1f} dB"


def _stats_text(d: dict[str, Any]) -> str:
    if d["identical"]:
        return "bit-identical"
    return (
        f"SQNR {_fmt_db(d['sqnr_db'])}, cosine {d['cosine']:.6f}, rel L2 {d['rel_l2']:.3g}, max abs {d['max_abs']:.3g}"
    )
