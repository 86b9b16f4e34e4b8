"""The built-in demo: generates small synthetic videos, pretrains a tiny AVSiam on CPU, finetunes
it as a classifier and evaluates retrieval and classification on held-out clips.

  python main.py --config=configs/demo.py --workdir=/tmp/avsiam_demo

`configs/demo.py:mode=pretrain` (or finetune, eval) runs one stage on its own.
"""
from configs import common


def get_config(arg=None):
  c = common.get_common_config()
  c.mode = common.parse_arg(arg or "mode=pretrain+finetune")["mode"]
  c.data.demo = True
  c.model.variant = "tiny"
  # Small inputs and decoder: a step costs about a third of one at 112 px / 2.56 s, so the
  # few CPU minutes go into more steps, which is what retrieval needs.
  c.model.image_size = 64
  c.model.audio_frames = 128
  c.model.decoder_width = 64
  c.model.decoder_depth = 1
  c.model.decoder_heads = 4
  c.batch_size = 40
  c.optim.lr = 3e-4
  # A softer temperature than the paper's 0.05 suits a batch of 40 and a few hundred steps.
  c.pretrain.tau = 0.2
  c.epochs = 80
  c.optim.decay_start_epoch = 60
  c.optim.decay_every_epochs = 10
  # Finetuning: every demo clip has one class, so softmax cross-entropy and top-1.
  f = c.finetune
  f.loss = "ce"
  f.batch_size = 40
  f.lr = 1e-4
  f.head_lr_mult = 10.0
  f.epochs = 10
  f.decay_start_epoch = 6
  f.decay_rate = 0.5
  f.decay_every_epochs = 2
  f.freqm, f.timem = 24, 24  # SpecAugment scaled to the 128-frame, 128-bin demo fbank
  # Retrieval finetuning (configs/demo.py:mode=retrieval_finetune, from a demo pretraining run
  # in config.finetune.init_checkpoint): the demo's batch and temperature.
  r = c.retrieval
  r.batch_size, r.tau, r.lr, r.epochs = 40, 0.2, 1e-4, 10
  r.decay_start_epoch, r.decay_every_epochs = 6, 2
  c.eval.every_epoch = c.mode == "retrieval_finetune"
  c.eval.max_clips = 0
  c.eval.retrieval_clips = 0
  c.eval.batch_size = 40
  c.checkpoint_every_steps = 50
  c.log_every_steps = 10
  return c
