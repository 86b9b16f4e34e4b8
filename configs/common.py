"""Settings shared by every config; the model-size configs change what differs."""
import ml_collections


def get_common_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"
  c.model.image_size = 224
  c.model.audio_frames = 1024
  c.model.mel_bins = 128
  c.model.audio_patch_mode = "floor"     # "floor" (released Huge: 9 x 73) or "pad" (10 x 74)
  c.model.audio_posemb_init = "nearest1d"  # released; or "bilinear2d"
  c.model.modality_norms = True          # per-modality LayerNorms, as released
  c.model.double_tokens = False          # released quirk, only to reproduce its checkpoints
  c.model.block_norm_eps = 1e-5
  c.model.final_norm_eps = 1e-6
  c.model.mm_depth = 2
  c.model.decoder_width = 512
  c.model.decoder_depth = 8
  c.model.decoder_heads = 16
  c.model.decoder_norm_eps = 1e-6
  c.model.separate_audio_patch = False   # released checkpoints: audio projection of its own
  c.model.dtype = "float32"              # compute dtype; "bfloat16" keeps float32 weights
  c.model.remat = False                  # recompute each block in the backward pass (less memory)

  # Weights to start from when the workdir has no checkpoint: a directory written by
  # `python -m avsiam_jax.weights.convert`, or a source file (format vitjax, timm or avsiam).
  c.model_init = ""
  c.model_init_format = "converted"

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.mask_ratios = (0.0, 0.2, 0.4, 0.6, 0.8)
  c.pretrain.tau = 0.05
  c.pretrain.mae_mask_ratio = 0.75
  c.pretrain.mae_stop_gradient = True
  c.pretrain.separate_optimizers = False  # released: one Adam per loss, contrastive first

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.b1 = 0.95
  c.optim.b2 = 0.999
  c.optim.weight_decay = 5e-7            # L2 added to the gradient, as torch Adam does
  c.optim.decay_start_epoch = 10         # lr x decay_rate at start, start+every, ...
  c.optim.decay_rate = 0.5
  c.optim.decay_every_epochs = 5

  c.epochs = 20
  c.total_steps = ml_collections.config_dict.placeholder(int)  # derived from epochs when unset
  # Global. The paper uses 1536, which does not split into 5 mask-ratio groups; 1600 does,
  # on 16, 32 or 64 devices alike.
  c.batch_size = 1600
  # Micro-batches per step (gradient accumulation); the update equals the full batch's.
  c.accum_steps = 1

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""                        # a dataset built by `python -m data_prep.build`
  c.data.train_split = "train"
  c.data.eval_split = "eval"
  c.data.time_shift = True
  c.data.worker_count = 0
  c.data.demo = False                    # generate the built-in demo dataset into the workdir

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0                 # 0: only at the end of training
  c.eval.max_clips = 1725
  c.eval.batch_size = 64
  c.eval.frame = 5                       # the middle of the 10 stored frames

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Logical parameter axis -> mesh axis.
  c.mesh.rules = ml_collections.ConfigDict({
      "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "head_dim": None})
  c.mesh.batch_shards = ml_collections.config_dict.placeholder(int)  # masking layout; default: mesh

  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  return c
