"""What SAM buys at equal compute, in miniature: the study's design, and its
report from the runs (`render`; scripts/sam_buys.py runs the quantized
evaluations, draws the figures and writes it).

    nanodo-sam sweep configs/sweeps/sam_buys.py --backend=local
    python scripts/sam_buys.py runs/sam_buys [--doc=docs/sam_buys.md]
        [--figures=docs]

The runs (configs/sweeps/sam_buys.py), on the miniature setting
(configs/miniature.py) and the evaluation seeds of the miniature study:
  1. pretraining on the C4 subset: AdamW, SAM and Precond Func-SAM at the
     rho the miniature study chose at its tuning seed (docs/miniature.md),
     Momentum-SAM at the best of MOMENTUM_GRID at the tuning seed, and AdamW
     for SAM's compute (twice the steps, the schedule stretched);
  2. each pretrained run trained further on tiny_shakespeare with AdamW for
     a fixed budget (configs/continued.py), its C4 eval loss logged all
     along: forgetting;
  3. each pretrained run's weights quantized to int8 and int4
     (`nanodo-sam eval --quantize`): the loss increase.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from nanodo_sam import miniature
from nanodo_sam import rundir
from nanodo_sam import runs as runs_lib
from nanodo_sam import sam as sam_lib
from nanodo_sam import sweep

SEEDS = miniature.EVAL_SEEDS  # Not the tuning seed: no selection bias.
TUNING_SEED = miniature.TUNING_SEED
# The rho the miniature study's grid chose at its tuning seed
# (docs/miniature.md, Table 1's rows).
CHOSEN_RHO = {"sam": 0.1, "precond_functional_sam": 1.0}
MOMENTUM_GRID = (0.1, 0.3, 1.0)
BASELINE = "adamw"
MATCHED = "adamw@sam"  # AdamW for SAM's compute.
ARMS = ("adamw", "sam", "precond_functional_sam", "momentum_sam", MATCHED)
WIDTHS = (8, 4)
CONFIG = "configs/miniature.py"
CONTINUED = "configs/continued.py"


def results(out: str, overrides: dict) -> dict:
  """A sweep run's results.json ({} until it has ended); its name is the
  sweep's (`sweep.run_name` against the sweep's config)."""
  workdir = os.path.join(out, sweep.run_name(overrides, CONFIG))
  res = rundir.read_results(workdir) if os.path.isdir(workdir) else None
  return res or {}


def completed(res: dict) -> bool:
  return res.get("status") == "completed"


def _final_loss(out: str, overrides: dict) -> float | None:
  """A sweep run's final eval loss once it has ended (+inf if it diverged),
  else None."""
  res = results(out, overrides)
  if res.get("status") not in ("completed", "diverged"):
    return None
  loss = res.get("final_eval_loss")
  ok = isinstance(loss, (int, float)) and math.isfinite(loss)
  return loss if ok else math.inf


def best_momentum_rho(out: str | None) -> float | None:
  """The rho of MOMENTUM_GRID with the lowest final eval loss at the tuning
  seed, once every one has ended in `out` (a diverged run counts as
  +inf)."""
  if not out:
    return None
  losses = {
      rho: _final_loss(out, arm_overrides("momentum_sam", TUNING_SEED, rho))
      for rho in MOMENTUM_GRID
  }
  if any(v is None for v in losses.values()):
    return None
  return min(MOMENTUM_GRID, key=losses.get)


def arm_overrides(arm: str, seed: int, rho: float | None = None) -> dict:
  """The sweep run (overrides) of one pretraining arm."""
  if arm == MATCHED:
    return {"sam.method": BASELINE, "compute_matched": "sam", "seed": seed}
  if arm == BASELINE:
    return {"sam.method": arm, "seed": seed}
  rho = CHOSEN_RHO.get(arm, rho)
  return {"sam.method": arm, "sam.rho": rho, "seed": seed}


def pretrained_runs(out: str | None) -> list[tuple[str, dict]]:
  """(arm, overrides) of every pretraining run: Momentum-SAM's at its best
  rho only once its grid at the tuning seed has ended."""
  rho = best_momentum_rho(out)
  return [
      (arm, arm_overrides(arm, seed, rho))
      for arm in ARMS
      for seed in SEEDS
      if arm != "momentum_sam" or rho is not None
  ]


def continued_overrides(out: str, pretrained: dict) -> dict:
  """The run that trains `pretrained` further (configs/continued.py)."""
  source = os.path.join(out, sweep.run_name(pretrained, CONFIG))
  return {"config": CONTINUED, "init_from": source}


# ------------------------------------------------------------ measurements

# Each arm as tables and legends name it (a method: its registry label).
LABEL = {
    **{a: runs_lib.method_label(a) for a in ARMS if a != MATCHED},
    MATCHED: "AdamW (SAM's compute)",
}
FORGET_TAG = "eval_c4/loss"  # configs/continued.py's second eval set.


@dataclasses.dataclass
class Measured:
  """One pretraining run and what was measured on it."""

  arm: str
  seed: int
  workdir: str
  loss: float  # final C4 eval loss
  flops: float  # its training FLOPs
  quant: dict  # {bits: eval-loss increase when quantized}
  forget_curve: list  # [(continued step, C4 eval loss)]
  continued_loss: float  # tiny_shakespeare eval loss after continuing

  @property
  def forgetting(self) -> float:
    """C4 eval loss after the continued run minus before it."""
    if not self.forget_curve:
      return math.nan
    return self.forget_curve[-1][1] - self.loss


def quant_path(workdir: str, bits: int) -> str:
  """Where scripts/sam_buys.py keeps `nanodo-sam eval --quantize`'s output."""
  return os.path.join(workdir, f"quantized_int{bits}.json")


def _json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _number(x) -> float:
  return float(x) if isinstance(x, (int, float)) else math.nan


def measure(out: str, arm: str, overrides: dict) -> Measured | None:
  """What one pretraining run measured, None until it has finished."""
  workdir = os.path.join(out, sweep.run_name(overrides, CONFIG))
  res = results(out, overrides)
  if not completed(res):
    return None
  quant = {}
  for bits in WIDTHS:
    q = _json(quant_path(workdir, bits))
    quant[bits] = _number(q["delta"]["eval_loss"]) if q else math.nan
  continued = continued_overrides(out, overrides)
  cont = os.path.join(out, sweep.run_name(continued, CONFIG))
  cont_res = results(out, continued)
  done = completed(cont_res)
  curve = runs_lib.read_scalars(cont, [FORGET_TAG]) if done else {}
  return Measured(
      arm=arm,
      seed=int(overrides["seed"]),
      workdir=workdir,
      loss=_number(res.get("final_eval_loss")),
      flops=_number(res.get("train_flops")),
      quant=quant,
      forget_curve=curve.get(FORGET_TAG, []),
      continued_loss=_number(cont_res.get("final_eval_loss"))
      if done
      else math.nan,
  )


def measure_all(out: str) -> list[Measured]:
  return [
      m
      for arm, o in pretrained_runs(out)
      if (m := measure(out, arm, o)) is not None
  ]


# ---------------------------------------------------------------- verdicts

# The rule, fixed before any run: a claim compares a method with AdamW
# through per-seed paired differences (same seed: same initialisation and
# data order). It holds if the 95% Student-t interval of the mean
# difference lies wholly on the claimed side of 0, does not hold if it lies
# wholly on the other side, and is inconclusive otherwise.
HOLDS, FAILS, UNSURE = miniature.HOLDS, miniature.FAILS, miniature.UNSURE
NOT_YET = "not measured yet"  # Fewer than 2 seeds on both sides.
SAM_FAMILY = ("sam", "precond_functional_sam", "momentum_sam")
CLAIMS = {
    "loss": (
        "Equal compute: the final loss",
        "A sharpness-aware method reaches a lower C4 eval loss than AdamW "
        "given the same training compute (the paper compares at equal "
        "steps, where a SAM-family step costs two plain ones).",
    ),
    "forgetting": (
        "Forgetting after continued training",
        "Watts et al. (2026): SAM-pretrained models forget less when "
        "trained further on other data: a smaller increase of the "
        "pretraining eval loss.",
    ),
    "int8": (
        "Quantization to int8",
        "Watts et al. (2026): SAM-pretrained models lose less when their "
        "weights are quantized: a smaller eval-loss increase.",
    ),
    "int4": (
        "Quantization to int4",
        "As for int8, at 4 bits.",
    ),
}


def _value(m: Measured, claim: str) -> float:
  if claim == "loss":
    return m.loss
  if claim == "forgetting":
    return m.forgetting
  return m.quant[int(claim[3:])]


def baseline_for(method: str, equal_compute: bool) -> str:
  """The AdamW arm `method` is compared with: at equal compute, AdamW for
  the method's compute (MATCHED for a two-pass method, AdamW itself for
  Momentum-SAM's one pass); else AdamW at equal steps."""
  if equal_compute and sam_lib.METHODS[method].cost > 1:
    return MATCHED
  return BASELINE


@dataclasses.dataclass
class Row:
  method: str
  versus: str
  diffs: dict  # {seed: method - versus}
  mean: float
  low: float
  high: float
  verdict: str


def compare(found: list[Measured], claim: str, method: str, versus: str):
  """The paired comparison of `method` with arm `versus` on `claim`."""
  a = {m.seed: _value(m, claim) for m in found if m.arm == method}
  b = {m.seed: _value(m, claim) for m in found if m.arm == versus}
  diffs = {
      s: a[s] - b[s]
      for s in sorted(set(a) & set(b))
      if math.isfinite(a[s] - b[s])
  }
  if len(diffs) < 2:
    return Row(method, versus, diffs, math.nan, math.nan, math.nan, NOT_YET)
  mean, low, high = miniature.t_interval(list(diffs.values()))
  verdict = miniature.sign_verdict(low, high, want_negative=True)
  return Row(method, versus, diffs, mean, low, high, verdict)


def claim_rows(found: list[Measured], claim: str) -> list[Row]:
  """Each SAM-family method against AdamW at equal steps and at equal
  compute (one row when they are the same run: Momentum-SAM)."""
  rows = []
  for method in SAM_FAMILY:
    seen = []
    for equal_compute in (False, True):
      versus = baseline_for(method, equal_compute)
      if versus not in seen:
        seen.append(versus)
        rows.append(compare(found, claim, method, versus))
  return rows


def overall(rows: list[Row], claim: str) -> str:
  """A claim's verdict from its primary rows: for the loss, at equal
  compute (the question asked); for the others, at equal steps (the
  setting of Watts et al.). Holds if it holds for some method and fails
  for none; does not hold if it fails for some method and holds for none;
  inconclusive otherwise."""
  verdicts = {
      r.verdict
      for r in rows
      if r.versus == baseline_for(r.method, claim == "loss")
  }
  if verdicts == {NOT_YET}:
    return NOT_YET
  if HOLDS in verdicts and FAILS not in verdicts:
    return HOLDS
  if FAILS in verdicts and HOLDS not in verdicts:
    return FAILS
  return UNSURE


# ------------------------------------------------------------------ report


def _f(x: float, claim: str = "loss") -> str:
  """A signed number: 4 decimals for losses, 2 significant digits for the
  quantization losses (1e-5 to 1e-3 nats here)."""
  if not math.isfinite(x):
    return "n/a"
  return f"{x:+.1e}" if claim.startswith("int") else f"{x:+.4f}"


def _mean_std(xs, claim: str = "loss") -> str:
  xs = [x for x in xs if math.isfinite(x)]
  if not xs:
    return "n/a"
  mean, std = runs_lib.mean_std(xs)
  if len(xs) == 1:
    return _f(mean, claim).lstrip("+")
  return f"{_f(mean, claim).lstrip('+')} ± {_f(std, claim).lstrip('+')}"


def arms_table(found: list[Measured]) -> list[str]:
  """Each arm's measurements, mean ± std over its seeds."""
  lines = [
      "| arm | seeds | training FLOPs | C4 eval loss | int8 increase | "
      "int4 increase | forgetting (C4 increase) | tiny_shakespeare loss "
      "after |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for arm in ARMS:
    ms = [m for m in found if m.arm == arm]
    if not ms:
      continue
    cells = [
        _mean_std([_value(m, c) for m in ms], c)
        for c in ("loss", "int8", "int4", "forgetting")
    ]
    lines.append(
        f"| {LABEL[arm]} | {', '.join(str(m.seed) for m in ms)} | "
        f"{ms[0].flops:.3e} | {' | '.join(cells)} | "
        f"{_mean_std([m.continued_loss for m in ms])} |"
    )
  return lines


def rows_table(rows: list[Row], claim: str) -> list[str]:
  lines = [
      "| method | versus | difference per seed | mean | 95% interval | "
      "verdict |",
      "|---|---|---|---|---|---|",
  ]
  for r in rows:
    f = lambda x: _f(x, claim)
    per_seed = ", ".join(f"{s}: {f(d)}" for s, d in r.diffs.items())
    lines.append(
        f"| {LABEL[r.method]} | {LABEL[r.versus]} | {per_seed or 'n/a'} | "
        f"{f(r.mean)} | ({f(r.low)}, {f(r.high)}) | {r.verdict} |"
    )
  return lines


def verdicts(found: list[Measured]) -> dict[str, tuple[list[Row], str]]:
  """{claim: (its rows, its verdict)}."""
  out = {}
  for claim in CLAIMS:
    rows = claim_rows(found, claim)
    out[claim] = (rows, overall(rows, claim))
  return out


SETUP = (
    "The miniature setting of docs/miniature.md (configs/miniature.py: "
    "Nanodo's defaults, D64 N2 H1 F256, rows of 64 tokens, batches of 16, "
    "300 steps of AdamW at peak learning rate 0.01 on the C4 subset shipped "
    "with the package, evaluated on its 200 validation documents), on the "
    "miniature study's evaluation seeds 1, 2 and 3 (seed 0 tunes; it is in "
    "no comparison). Arms: AdamW; SAM at rho 0.1 and Precond Func-SAM at "
    "rho 1, the rhos the miniature study's grid chose at seed 0; "
    "Momentum-SAM (one forward and one backward per step, as AdamW) at the "
    "best of rho {grid} at seed 0 ({rho}); and AdamW for SAM's compute: 600 "
    "steps, warmup and cosine schedule stretched with them (`compute_matched`"
    "; 1.3 epochs of the subset, so it sees its batches a second time). "
    "Each pretrained run is then (a) quantized, weights only, round to "
    "nearest, symmetric, per output channel, embeddings kept in float "
    "(`nanodo-sam eval --quantize=int8|int4`), and (b) trained further on "
    "tiny_shakespeare (configs/continued.py: 100 steps of AdamW at peak "
    "3e-3 from fresh optimizer state, the same batches for every source), "
    "its C4 eval loss logged every 25 steps."
)

RULE = (
    "Rule, fixed before the runs: each claim compares a method with AdamW "
    "through per-seed paired differences (method minus AdamW, same seed: "
    "same initialisation and data order; negative favours the method). It "
    "holds for a method if the 95% Student-t interval of the mean "
    "difference (3 seeds: t = 4.30) lies below 0, does not hold if it lies "
    "above 0, and is inconclusive otherwise. A claim's verdict: holds if "
    "it holds for some SAM-family method and fails for none, does not hold "
    "if it fails for some and holds for none, inconclusive otherwise. The "
    "loss is judged at equal compute (AdamW for SAM's compute against SAM "
    "and Precond Func-SAM; AdamW itself against Momentum-SAM); forgetting "
    "and quantization at equal steps, the setting of Watts et al. (2026), "
    "with the equal-compute comparison shown beside it."
)


def render(found: list[Measured], out_dir: str, rho, times: str) -> str:
  """The report (docs/sam_buys.md) as markdown."""
  judged = verdicts(found)
  lines = [
      "# What SAM buys at equal compute, in miniature",
      "",
      SETUP.format(grid=", ".join(map(str, MOMENTUM_GRID)), rho=rho),
      "",
      "```bash",
      "nanodo-sam sweep configs/sweeps/sam_buys.py --backend=local "
      "--parallel=2",
      f"python scripts/sam_buys.py {out_dir}",
      "```",
      "",
      times,
      "",
      RULE,
      "",
      "| claim | verdict |",
      "|---|---|",
  ]
  lines += [f"| {CLAIMS[c][0]} | **{v}** |" for c, (_, v) in judged.items()]
  lines += ["", "## Every arm", ""] + arms_table(found)
  for claim, (rows, verdict) in judged.items():
    title, text = CLAIMS[claim]
    lines += ["", f"## {title}", "", text, "", *rows_table(rows, claim)]
    lines += ["", f"**Verdict: {verdict}.**"]
  lines += ["", "## Figures", ""]
  lines += [f"![{name}](sam_buys_{name}.png)" for name in FIGURES]
  return "\n".join(lines) + "\n"


FIGURES = ("flops", "forgetting", "quantization")
