"""Table 3 (and Tables 4, 6): four sizes x four methods, Chinchilla training.

Steps = ceil(20 x non-embedding params / 131,072) per size (see
configs/c4_chinchilla.py). Tables 4 and 6 are the sharpness of the best runs
at 23.9M and 117.9M: run `nanodo-sam analyze --workdir=RUN` on them (it writes
sharpness.json) before `nanodo-sam tables`.
"""

from nanodo_sam import paper_sweeps as common
from nanodo_sam.sweep_spec import SweepSpec


def get_sweep():
  return SweepSpec(
      name="table3",
      config=common.CHINCHILLA,
      runs=common.size_runs(common.CHINCHILLA),
  )
