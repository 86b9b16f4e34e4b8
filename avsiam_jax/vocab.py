"""The names configs/*.py and config.py share. Imports nothing, so loading a config file pulls
in no JAX, Flax or TFDS."""

MODES = ("pretrain", "finetune", "eval", "pretrain+finetune")
# The stages a mode trains, in order.
STAGES = {"pretrain": ("pretrain",), "finetune": ("finetune",), "eval": (),
          "pretrain+finetune": ("pretrain", "finetune")}
# config.model.dtype values (config.DTYPES maps them to JAX types).
DTYPE_NAMES = ("float32", "bfloat16")
# What the early-stop counter counts epochs since (selection.py): the best of the selection
# metric, or the best audio-visual mAP (the release, even when top-1 selects the best epoch).
EARLY_STOP_METRICS = ("selection", "mAP")
MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every mesh axis that holds different examples.
BATCH_AXES = ("data", "fsdp")
