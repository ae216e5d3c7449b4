"""What SAM buys (nanodo_sam/sam_buys.py, configs/sweeps/sam_buys.py,
scripts/sam_buys.py): the sweep's stages, the paired verdicts and the
report, on run directories written by hand (no training here)."""

import json
import math
import os

import pytest

from nanodo_sam import sam_buys as study
from nanodo_sam import sweep as sw
from scripts import sam_buys as script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "configs", "sweeps", "sam_buys.py")
T_975_2 = 4.302652729911275  # Student-t, 2 degrees of freedom, 97.5%.


def _finish(out, name, loss, status="completed"):
  os.makedirs(out / name, exist_ok=True)
  (out / name / "results.json").write_text(
      json.dumps({"status": status, "final_eval_loss": loss})
  )


def _names(out):
  return {r.name: r for r in sw.load_sweep(SWEEP, out=str(out)).runs}


def test_the_sweep_adds_each_stage_once_its_inputs_exist(tmp_path):
  out = tmp_path / "out"
  names = _names(out)
  assert len(names) == 3 + 4 * 3  # The grid; 4 arms x 3 seeds.
  assert "adamw-compute_matched=sam-seed2" in names
  assert not [
      n
      for n in names
      if n.startswith(("continued", "momentum_sam-rho0.3-seed1"))
  ]
  _finish(out, "momentum_sam-rho0.1-seed0", 7.3)
  _finish(out, "momentum_sam-rho0.3-seed0", 7.1)
  assert len(_names(out)) == 15  # rho 1.0 has not ended.
  _finish(out, "momentum_sam-rho1.0-seed0", None, status="diverged")
  _finish(out, "adamw-seed1", 7.2)
  names = _names(out)
  assert {f"momentum_sam-rho0.3-seed{s}" for s in (1, 2, 3)} <= set(names)
  cont = names["continued-from_adamw-seed1"]
  assert cont.config == "configs/continued.py"
  assert cont.overrides == {"init_from": str(out / "adamw-seed1")}
  assert len(names) == 15 + 3 + 1


def _m(arm, seed, loss, q4=math.nan, curve=()):
  return study.Measured(
      arm, seed, "", loss, 1.0, {8: math.nan, 4: q4}, list(curve), math.nan
  )


def test_paired_differences_give_the_verdicts():
  diffs = [-0.10, -0.12, -0.05]
  found = [_m("adamw", s, 7.0) for s in (1, 2, 3)]
  found += [_m("sam", s, 7.0 + d) for s, d in zip((1, 2, 3), diffs)]
  row = study.compare(found, "loss", "sam", "adamw")
  mean = sum(diffs) / 3
  std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
  half = T_975_2 * std / math.sqrt(3)
  assert row.mean == pytest.approx(mean)
  assert (row.low, row.high) == pytest.approx((mean - half, mean + half))
  assert row.verdict == study.HOLDS
  worse = [_m("sam", s, 7.0 - d) for s, d in zip((1, 2, 3), diffs)]
  assert study.compare(found[:3] + worse, "loss", "sam", "adamw").verdict == (
      study.FAILS
  )
  mixed = [_m("sam", s, 7.0 + d) for s, d in zip((1, 2, 3), (-0.1, 0.1, 0))]
  assert study.compare(found[:3] + mixed, "loss", "sam", "adamw").verdict == (
      study.UNSURE
  )
  one = study.compare(found[:1] + found[3:4], "loss", "sam", "adamw")
  assert one.verdict == study.NOT_YET and one.diffs == {1: pytest.approx(-0.1)}


def test_equal_compute_compares_two_pass_methods_with_matched_adamw():
  assert study.baseline_for("sam", equal_compute=True) == study.MATCHED
  assert study.baseline_for("precond_functional_sam", True) == study.MATCHED
  assert study.baseline_for("momentum_sam", True) == "adamw"  # One pass.
  assert study.baseline_for("sam", equal_compute=False) == "adamw"
  # SAM beats AdamW at equal steps but loses to AdamW at SAM's compute: the
  # loss claim (judged at equal compute) does not hold.
  found = []
  for s in (1, 2, 3):
    found += [
        _m("adamw", s, 7.2 + 0.01 * s),
        _m(study.MATCHED, s, 6.9 + 0.01 * s),
        _m("sam", s, 7.0 + 0.02 * s),
    ]
  rows = study.claim_rows(found, "loss")
  by = {(r.method, r.versus): r.verdict for r in rows}
  assert by[("sam", "adamw")] == study.HOLDS
  assert by[("sam", study.MATCHED)] == study.FAILS
  assert by[("momentum_sam", "adamw")] == study.NOT_YET
  assert study.overall(rows, "loss") == study.FAILS
  forgetting = study.claim_rows(found, "forgetting")  # None continued.
  assert study.overall(forgetting, "forgetting") == study.NOT_YET


def test_forgetting_is_the_c4_loss_after_minus_before():
  m = _m("sam", 1, 7.0, curve=[(25, 7.4), (100, 7.9)])
  assert m.forgetting == pytest.approx(0.9)
  assert math.isnan(_m("sam", 1, 7.0).forgetting)  # Not continued yet.
  assert study._value(_m("sam", 1, 7.0, q4=0.02), "int4") == 0.02


def test_the_report_script_refuses_a_missing_study(tmp_path, capsys):
  assert script.main([str(tmp_path / "nope")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "run the sweep first" in err[0]


def test_the_report_gives_each_claims_verdict_and_every_arm():
  found = []
  for s, d in zip((1, 2, 3), (0.10, 0.12, 0.05)):
    found += [
        _m("adamw", s, 7.0, q4=1e-3),
        _m(study.MATCHED, s, 7.0, q4=1e-3),
        _m("sam", s, 7.0 - d, q4=2e-3 + d / 100),
    ]
  text = study.render(found, "runs/sam_buys", 0.3, "Measured: now.")
  assert "| Equal compute: the final loss | **holds** |" in text
  assert "| Quantization to int4 | **does not hold** |" in text
  assert "| Forgetting after continued training | **not measured yet** |" in (
      text
  )
  assert "| SAM | 1, 2, 3 | 1.000e+00 | 6.9100 ± 0.0361 |" in text
  assert "1: +2.0e-03, 2: +2.2e-03, 3: +1.5e-03" in text  # int4, per seed.
  assert "(0.1, 0.3, 1.0) at seed 0 (0.3)" not in text
  assert "at the best of rho 0.1, 0.3, 1.0 at seed 0 (0.3)" in text
