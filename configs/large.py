"""AVSiam-Large (ViT-L/16), paper Table 10: pretraining on AudioSet-2M (32 GPUs x 48) and
finetuning on AS-20K, AS-2M or VGGSound.

  python main.py --config=configs/large.py --workdir=W_pt --config.data.dir=AS2M
  python main.py --config=configs/large.py:mode=finetune,dataset=as2m --workdir=W_ft \
      --config.data.dir=AS2M --config.finetune.init_checkpoint=W_pt
"""
from configs import common


def get_config(arg=None):
  return common.get_config("L/16", arg)
