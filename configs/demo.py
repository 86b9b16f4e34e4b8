"""The built-in demo: generates small synthetic videos, pretrains a tiny AVSiam on CPU, and
evaluates zero-shot audio<->video retrieval on held-out clips (a few minutes on 2 cores).

  python main.py --config=configs/demo.py --workdir=/tmp/avsiam_demo
"""
from configs import common


def get_config(arg=None):
  c = common.get_common_config()
  c.data.demo = True
  c.data.demo_train_clips = 400
  c.data.demo_eval_clips = 100
  c.model.variant = "tiny"
  c.model.image_size = 112
  c.model.audio_frames = 256
  c.model.decoder_width = 128
  c.model.decoder_depth = 2
  c.model.decoder_heads = 4
  c.batch_size = 40
  c.optim.lr = 3e-4
  c.epochs = 30
  c.optim.decay_start_epoch = 20
  c.optim.decay_every_epochs = 5
  c.eval.max_clips = 100
  c.eval.batch_size = 40
  c.checkpoint_every_steps = 50
  c.log_every_steps = 10
  return c
