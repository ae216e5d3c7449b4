"""Table 3 (and Tables 4, 6): four sizes x four methods, Chinchilla training.

Steps = ceil(20 x non-embedding params / 131,072) per size (see
configs/c4_chinchilla.py). Tables 4 and 6 are the sharpness of the best runs
at 23.9M and 117.9M: run `nanodo-sam analyze --workdir=RUN` on them (it writes
sharpness.json) before scripts/make_tables.py.
"""

from configs.sweeps import common
from configs.sweeps import table2
from configs.sweeps.authoring import SweepSpec


def get_sweep():
  return SweepSpec(name="table3", config=common.CHINCHILLA,
                   runs=table2.size_runs(common.CHINCHILLA))
