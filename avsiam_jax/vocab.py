"""The names configs/*.py and config.py share. Imports nothing, so loading a config file pulls
in no JAX, Flax or TFDS."""

MODES = ("pretrain", "finetune", "retrieval_finetune", "eval", "pretrain+finetune")
# The stages a mode trains, in order.
STAGES = {"pretrain": ("pretrain",), "finetune": ("finetune",),
          "retrieval_finetune": ("retrieval_finetune",), "eval": (),
          "pretrain+finetune": ("pretrain", "finetune")}
# The stages that start from a run directory, config.finetune.init_checkpoint, when it is set.
FROM_RUN_STAGES = ("finetune", "retrieval_finetune")
# config.model.dtype values (config.DTYPES maps them to JAX types).
DTYPE_NAMES = ("float32", "bfloat16")
# What the early-stop counter counts epochs since (selection.py): the best of the selection
# metric, or the best audio-visual mAP (the release, even when top-1 selects the best epoch).
EARLY_STOP_METRICS = ("selection", "mAP")
MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every mesh axis that holds different examples.
BATCH_AXES = ("data", "fsdp")
