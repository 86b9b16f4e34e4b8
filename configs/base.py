"""AVSiam-Base (ViT-B/16), paper Table 9: pretraining on AudioSet-2M (16 GPUs x 96) and
finetuning on AS-20K, AS-2M or VGGSound.

  python main.py --config=configs/base.py --workdir=W_pt --config.data.dir=AS2M
  python main.py --config=configs/base.py:mode=finetune,dataset=as20k --workdir=W_ft \
      --config.data.dir=AS20K --config.finetune.init_checkpoint=W_pt
  python main.py --config=configs/base.py:mode=eval,dataset=as20k --workdir=W_ft \
      --config.data.dir=AS20K
"""
from configs import common


def get_config(arg=None):
  return common.get_config("B/16", arg)
