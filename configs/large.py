"""AVSiam-Large pretraining on AudioSet-2M (paper Table 10: 32 GPUs x 48).

  python main.py --config=configs/large.py --workdir=W --config.data.dir=DATASET
"""
from configs import common


def get_config(arg=None):
  c = common.get_common_config()
  c.model.variant = "L/16"
  return c
