"""AVSiam-Huge (ViT-H/14), paper Table 11: pretraining on AudioSet-2M (64 V100 x 24) and
finetuning on AS-20K, AS-2M or VGGSound.

ViT-H/14 does not divide the 1024 x 128 spectrogram; model.audio_patch_mode picks "floor"
(9 x 73 = 657 tokens, as the released model) or "pad" (10 x 74).

  python main.py --config=configs/huge.py --workdir=W_pt --config.data.dir=AS2M
  python main.py --config=configs/huge.py:mode=finetune,dataset=vggsound --workdir=W_ft \
      --config.data.dir=VGGSOUND --config.finetune.init_checkpoint=W_pt
"""
from configs import common


def get_config(arg=None):
  return common.get_config("H/14", arg)
