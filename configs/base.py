"""AVSiam-Base pretraining on AudioSet-2M (paper Table 9: 16 GPUs x 96).

  python main.py --config=configs/base.py --workdir=W --config.data.dir=DATASET
"""
from configs import common


def get_config(arg=None):
  c = common.get_common_config()
  c.model.variant = "B/16"
  return c
