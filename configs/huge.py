"""AVSiam-Huge pretraining on AudioSet-2M (paper Table 11: 64 V100 x 24).

ViT-H/14 does not divide the 1024 x 128 spectrogram; model.audio_patch_mode picks "floor"
(9 x 73 = 657 tokens, as the released model) or "pad" (10 x 74).

  python main.py --config=configs/huge.py --workdir=W --config.data.dir=DATASET
"""
from configs import common


def get_config(arg=None):
  c = common.get_common_config()
  c.model.variant = "H/14"
  return c
