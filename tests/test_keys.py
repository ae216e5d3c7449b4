"""The one table of config keys (nanodo_sam/keys.py)."""

import ml_collections
import pytest

from nanodo_sam import config as config_lib
from nanodo_sam import keys
from nanodo_sam.errors import UsageError

# The default config as it was before the key table existed (configs/base.py
# then), flattened: keys.defaults() must reproduce it exactly.
FROZEN_DEFAULTS = {
    'seed': 0,
    'workdir': '',
    'schedule_name': '',
    'init_from': '',
    'model.D': 256,
    'model.H': 4,
    'model.N': 3,
    'model.F': 1024,
    'model.L': 512,
    'model.V': 32101,
    'model.nonlinearity': 'gelu',
    'model.dtype': 'float32',
    'model.remat': False,
    'model.head_chunk_tokens': 4096,
    'model.kernel_init': 'xavier_uniform',
    'model.residual_dtype': 'float32',
    'model.attention': 'auto',
    'model.size_name': '',
    'data.tfds_name': 'c4/en:3.1.0',
    'data.tfds_data_dir': '',
    'data.use_shipped': False,
    'data.download': False,
    'data.train_split': 'train',
    'data.eval_split': 'validation',
    'data.train_files': '',
    'data.eval_files': '',
    'data.text_column': 'text',
    'data.vocab': 'shipped:c4_t5_sentencepiece_cc_all.32000.100extra.model',
    'data.batch_size': 256,
    'data.eval_batch_size': 64,
    'data.eval_steps': 8,
    'data.shuffle_buffer': 1024,
    'data.add_bos': True,
    'data.packing': 'nanodo',
    'data.eval_mode': 'per_document',
    'opt.optimizer': 'adamw',
    'opt.num_train_steps': 10000,
    'opt.peak_learning_rate': 0.001,
    'opt.init_learning_rate': None,
    'opt.final_learning_rate': None,
    'opt.warmup_steps': 1000,
    'opt.decay_type': 'cosine',
    'opt.weight_decay': 0.0001,
    'opt.independent_weight_decay': True,
    'opt.weight_decay_exclusions': '',
    'opt.b1': 0.9,
    'opt.b2': 0.98,
    'opt.eps': 1e-09,
    'opt.clip_by_global_norm': 0.0,
    'sam.method': 'adamw',
    'sam.rho': 0.0,
    # The methods' own options (sam.Option), in the registry's order.
    'sam.phi': None,
    'sam.precond_normalize': 'after',
    'sam.adaptive_eta': None,
    'sam.alpha': None,
    'sam.rho_warmup_steps': 0,
    'sam.start_step': 0,
    'sam.end_step': -1,
    'sam.every_k': 1,
    'sam.reuse': False,
    'sam.perturbation_scope': 'global',
    'sam.rho_schedule': 'constant',
    'sam.rho_min': None,
    'grad_accumulation_steps': 1,
    'eval_every_steps': 500,
    'eval_data_from': '',
    'eval_data_name': 'other',
    'checkpoint_every_steps': 1000,
    'checkpoint_max_to_keep': 3,
    'log_every_steps': 50,
    'diagnostics.every_steps': 0,
    'diagnostics.num_batches': 1,
    'diagnostics.batch_size': 8,
    'diagnostics.num_iters': 20,
    'diagnostics.num_probes': 10,
    'diagnostics.tol': 0.001,
    'diagnostics.on_train_batch': False,
    'eval.lm_eval_tasks': '',
    'eval.lm_eval_every': 0,
    'profile.start_step': 10,
    'profile.num_steps': 0,
    'wandb.enabled': False,
    'wandb.project': 'nanodo-sam',
    'wandb.mode': 'offline',
    'mesh.data': -1,
    'mesh.fsdp': 1,
    'mesh.tensor': 1,
    'mesh.device_memory_gb': 0.0,
}


def _flat(cfg) -> dict:
  return config_lib.flatten(config_lib.to_dict(cfg))


def test_defaults_are_the_frozen_defaults():
  got = _flat(keys.defaults())
  assert list(got) == list(FROZEN_DEFAULTS)
  for name, want in FROZEN_DEFAULTS.items():
    assert type(got[name]) is type(want), name
    assert got[name] == want, name


def test_configs_base_is_the_table():
  base = config_lib.load_config_file('configs/base.py')
  assert _flat(base) == _flat(keys.defaults())


def test_placeholders_take_floats():
  c = keys.defaults()
  assert c.opt.init_learning_rate is None
  c.opt.init_learning_rate = 0.5
  with pytest.raises(TypeError):
    c.opt.final_learning_rate = 'x'


def test_every_key_has_a_meaning_and_a_valid_default():
  assert len(keys.KEYS) == len(FROZEN_DEFAULTS)
  assert [k.name for k in keys.KEYS] == list(FROZEN_DEFAULTS)
  for key in keys.KEYS:
    assert key.meaning.strip(), key.name
  keys.check(keys.defaults())  # The defaults pass their own checks.


def test_check_reads_the_table():
  c = keys.defaults()
  c.data.packing = 'zigzag'
  with pytest.raises(
      UsageError,
      match="data.packing='zigzag' is unknown; " 'use one of nanodo, shifted',
  ):
    keys.check(c)
  c = keys.defaults()
  c.opt.b2 = 1.0
  with pytest.raises(UsageError, match=r'opt.b2=1.0 must lie in \[0, 1\)'):
    keys.check(c)
  c = ml_collections.ConfigDict({'seed': '0'})
  with pytest.raises(UsageError, match="seed='0' must be an integer"):
    keys.check(c)
