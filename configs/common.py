"""Settings shared by every config; the model-size configs change what differs.

`get_config(variant, arg)` reads the `:arg` of `--config=configs/base.py:mode=finetune,dataset=as20k`
(keys: mode = pretrain | finetune | retrieval_finetune | eval | pretrain+finetune; dataset = as20k |
as2m | vggsound | msrvtt | custom) and fills the finetuning schedule of the paper's Tables 9-11;
msrvtt (retrieval only) scores every clip of the eval split.
"""
import ml_collections

from avsiam_jax.vocab import MODES, STAGES

DATASETS = ("as20k", "as2m", "vggsound", "msrvtt", "custom")
# Datasets without a classification recipe (MSR-VTT has no class labels): retrieval only.
RETRIEVAL_DATASETS = ("msrvtt",)

# Paper Tables 9-11, finetuning: (lr, head multiplier, decay start epoch, decay rate, per-GPU
# batch, GPUs); the global batch is their product. Decay every epoch, 15 epochs, for all.
FINETUNE_TABLE = {
    "B/16": {"as20k": (1e-4, 100, 2, 0.75, 8, 4), "as2m": (5e-6, 50, 5, 0.75, 32, 4),
             "vggsound": (5e-5, 10, 2, 0.75, 32, 4)},
    "L/16": {"as20k": (5e-5, 100, 2, 0.75, 8, 4), "as2m": (5e-6, 50, 2, 0.5, 16, 8),
             "vggsound": (5e-6, 50, 2, 0.5, 16, 8)},
    "H/14": {"as20k": (1e-5, 100, 5, 0.5, 4, 8), "as2m": (5e-6, 50, 2, 0.5, 4, 8),
             "vggsound": (5e-6, 50, 2, 0.5, 4, 8)},
}


def parse_arg(arg) -> dict[str, str]:
  """"mode=finetune,dataset=as20k" -> dict; unknown keys or values are an error."""
  out = {"mode": "pretrain", "dataset": "custom"}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in out:
      raise ValueError(f"config arg {item!r}: expected mode=... or dataset=...")
    out[key] = value
  if out["mode"] not in MODES:
    raise ValueError(f"config arg mode={out['mode']!r}: must be one of {MODES}")
  if out["dataset"] not in DATASETS:
    raise ValueError(f"config arg dataset={out['dataset']!r}: must be one of {DATASETS}")
  if out["dataset"] in RETRIEVAL_DATASETS and "finetune" in STAGES[out["mode"]]:
    raise ValueError(f"config arg dataset={out['dataset']}: has no classification recipe; use "
                     "mode=retrieval_finetune, pretrain or eval")
  return out


def get_config(variant: str, arg=None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  c = get_common_config()
  c.model.variant = variant
  # Accelerators: bfloat16 compute; parameters, Adam, LayerNorm, softmax statistics and the
  # losses stay float32. (The demo keeps float32, which is faster on CPU.)
  c.model.dtype = "bfloat16"
  c.mode = args["mode"]
  f = c.finetune
  f.dataset = args["dataset"]
  if f.dataset not in ("custom", *RETRIEVAL_DATASETS):
    f.lr, f.head_lr_mult, f.decay_start_epoch, f.decay_rate, per_gpu, gpus = (
        FINETUNE_TABLE[variant][f.dataset])
    f.batch_size = per_gpu * gpus
    f.decay_every_epochs, f.epochs = 1, 15
    f.balanced = f.dataset in ("as2m", "vggsound")
    f.loss = "ce" if f.dataset == "vggsound" else "bce"
    # The released AS-2M and VGGSound runs give each GPU a full-length weighted sampler: one
    # epoch is GPUs x N draws, and the lr decay counts those epochs. The GPUs are those of the
    # paper's table for this model (Base 4, Large and Huge 8; the released scripts run 8).
    f.epoch_length = float(gpus) if f.balanced else 1.0
    # The released AudioSet recipes train the multimodal blocks at 100x the base rate.
    f.mm_lr_mult = 1.0 if f.dataset == "vggsound" else 100.0
  if c.mode != "pretrain":
    # Classification and retrieval over the whole eval split: mode=eval scores a named set
    # (MSR-VTT's test split, a retrieval subset) whole; the caps are pretraining's monitoring.
    c.eval.max_clips = c.eval.retrieval_clips = 0
  if c.mode == "retrieval_finetune":
    c.eval.every_epoch = True  # the best epoch's audio->video R@1, as Table 3a reports
  return c


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
  # A LayerNorm between the multimodal blocks and the decoder's embedding, as MAE normalizes
  # before its decoder; the released model has none (False).
  c.model.mm_norm = True
  c.model.separate_audio_patch = False   # released checkpoints: audio projection of its own
  c.model.dtype = "float32"              # compute dtype; "bfloat16" keeps float32 weights
  # Recompute block activations in the backward pass: "none", "dots" (keep the weight matmuls'
  # outputs) or "full" (keep only block inputs); False/True mean "none"/"full".
  c.model.remat = "none"
  c.model.scan = False                   # each stack of blocks as one jax.lax.scan
  # Attention: "auto" (CPU: "chunked", cache-sized chunks of heads; NVIDIA GPU in bfloat16:
  # "cudnn", the fused kernel; otherwise "dense"), or one of those three. Same function.
  c.model.attention = "auto"

  # Weights to start from when the workdir has no checkpoint: a directory written by
  # `python -m avsiam_jax.weights.convert`, or a source file (format vitjax, timm or avsiam).
  c.model_init = ""
  c.model_init_format = "converted"

  c.pretrain = ml_collections.ConfigDict()
  # The released ratio set; the paper's text says "0% to 50%":
  # --config.pretrain.mask_ratios="(0.0,0.1,0.2,0.3,0.4,0.5)" (with a batch split into 6 groups).
  c.pretrain.mask_ratios = (0.0, 0.2, 0.4, 0.6, 0.8)
  # A ratio set per modality (paper Table 4), each splitting the batch into its own groups;
  # () uses mask_ratios. A fixed ratio is a one-element set, (0.0,) no masking.
  c.pretrain.audio_mask_ratios = ()
  c.pretrain.video_mask_ratios = ()
  # L = contrastive_weight * L_c + reconstruction_weight * L_rec (the release's
  # contrast_loss_weight and mae_loss_weight); a weight of 0 takes its loss out of the step
  # (Table 8's L_c alone: reconstruction_weight=0, no decoder work or update). Not both 0.
  c.pretrain.contrastive_weight = 1.0
  c.pretrain.reconstruction_weight = 1.0
  c.pretrain.tau = 0.05
  # InfoNCE: "symmetric" (released: the mean of audio->video and video->audio) or
  # "audio_to_video" (the paper's Eq. 1).
  c.pretrain.contrastive = "symmetric"
  c.pretrain.mae_mask_ratio = 0.75
  c.pretrain.mae_stop_gradient = True
  c.pretrain.separate_optimizers = False  # released: one Adam per loss, contrastive first
  # The ratio groups of a modality packed into rows of about equal length with attention kept
  # inside each example (packing.py): one encoder call instead of one per group, same features.
  c.pretrain.pack_groups = True

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
  c.data.demo_train_clips = 400          # its clips (with demo)
  c.data.demo_eval_clips = 100

  # Finetuning (mode finetune): the classifier on the pretrained encoder and multimodal blocks.
  # Adam's betas and weight decay come from `optim`.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.dataset = "custom"
  c.finetune.init_checkpoint = ""        # a pretraining workdir or its checkpoints/<step>
  c.finetune.loss = "bce"                # "bce" (multi-label, sigmoid) or "ce" (single-label)
  c.finetune.lr = 1e-4
  c.finetune.head_lr_mult = 100.0        # the three heads
  c.finetune.mm_lr_mult = 1.0            # the multimodal blocks
  c.finetune.decay_start_epoch = 2
  c.finetune.decay_rate = 0.75
  c.finetune.decay_every_epochs = 1
  c.finetune.epochs = 15
  # Samples per epoch in training-split lengths N (the lr decay counts these epochs).
  c.finetune.epoch_length = 1.0
  c.finetune.total_steps = ml_collections.config_dict.placeholder(int)
  c.finetune.batch_size = 32
  c.finetune.balanced = False            # class-balanced sampling with replacement
  c.finetune.mixup = 0.5
  c.finetune.label_smoothing = 0.1
  c.finetune.freqm = 48
  c.finetune.timem = 192
  # Probability of an audio-visual, audio-only and visual-only step.
  c.finetune.modality_mix = (0.5, 0.25, 0.25)
  # Consecutive equal parts of the batch that each draw their own modality, the loss the mean of
  # theirs: 1 is one draw per step; the release draws per GPU (8: an 8-GPU step). With more than
  # one, every step runs the audio-visual pass for all clips.
  c.finetune.modality_shards = 1
  # Evaluation scores: "loss" (sigmoid for bce, softmax for ce) or "sigmoid" for every loss (the
  # release, also for VGGSound's ce), before the 10-frame mean; mAP, AUC and top-1 use them.
  c.finetune.eval_scores = "loss"

  # Retrieval finetuning (mode retrieval_finetune, paper Table 3a): the encoder of the run
  # config.finetune.init_checkpoint (or model_init) trained on the contrastive loss alone over
  # the training split (no labels needed), evaluated every epoch (eval.every_epoch) and the
  # epoch of the best audio->video R@1 kept. Adam's betas and weight decay come from `optim`;
  # ratio-group layout switches (pack_groups, accum_steps) from pretraining. Our recipe: the
  # paper and the release give none (docs/reproducing.md).
  c.retrieval = ml_collections.ConfigDict()
  c.retrieval.lr = 5e-5
  c.retrieval.decay_start_epoch = 5
  c.retrieval.decay_rate = 0.5
  c.retrieval.decay_every_epochs = 5
  c.retrieval.epochs = 20
  c.retrieval.total_steps = ml_collections.config_dict.placeholder(int)
  c.retrieval.batch_size = 256
  c.retrieval.mask_ratios = (0.0,)       # no masking: the features retrieval compares
  c.retrieval.tau = 0.05
  c.retrieval.contrastive = "symmetric"

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0                 # 0: only at the end of training
  c.eval.max_clips = 1725                # clips of the eval split to use; 0: all
  c.eval.retrieval_clips = 1725          # zero-shot retrieval over the first of those, or:
  # a named subset of the eval split (python -m data_prep.retrieval_subset), e.g. the paper's
  # 5 clips per class; it overrides retrieval_clips.
  c.eval.retrieval_subset = ""
  c.eval.batch_size = 64
  c.eval.frame = 5                       # the middle of the 10 stored frames (retrieval)
  c.eval.plot_classes = 10               # embedding plot: the most frequent classes
  # Released finetuning: evaluate every epoch, report the best epoch and keep its checkpoint
  # (WORKDIR/best), stop after early_stop_epochs epochs without improvement (0: never).
  c.eval.every_epoch = False
  c.eval.early_stop_epochs = 3
  # What a gain is: "selection" (of the metric that picks the best epoch) or "mAP" (of the
  # audio-visual mAP, as released, even when top-1 picks the best epoch; without a classifier,
  # the selection metric).
  c.eval.early_stop_metric = "selection"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Logical parameter axis -> mesh axis.
  c.mesh.rules = ml_collections.ConfigDict({
      "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "head_dim": None})
  c.mesh.batch_shards = ml_collections.config_dict.placeholder(int)  # masking layout; default: mesh

  # Compile the train step for a TPU topology (e.g. "v5p:4x4x4") on any machine, report memory,
  # FLOPs, collectives and the cost model's step time, and stop: no dataset, no training.
  c.compile_only = ml_collections.ConfigDict()
  c.compile_only.topology = ""
  c.compile_only.num_classes = 527       # finetuning heads when no dataset says (AudioSet)

  # JAX's persistent compilation cache, so a restarted or preempted run does not compile again:
  # "" is WORKDIR/compile_cache (shared by the run's processes), "none" turns it off. The
  # JAX_COMPILATION_CACHE_DIR environment variable, when set, wins.
  c.compile_cache_dir = ""

  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  return c
