#!/bin/bash
# AVSiam pretraining on a SLURM GPU cluster: one process (task) per GPU, launched by srun.
#
#   sbatch scripts/slurm_pretrain.sh configs/huge.py /shared/avsiam_runs/huge /shared/datasets/vggsound [extra flags]
#
# e.g. extra flags: --config.batch_size=1600 --config.model_init=/shared/weights/vit_h14_converted
# Every task runs `python main.py`; avsiam_jax.distributed sees SLURM_NTASKS > 1 inside the srun
# step and calls jax.distributed.initialize(), which reads the coordinator (first node of the
# step, port derived from the job id; JAX_COORDINATOR_PORT overrides it), the process count
# (SLURM_NTASKS) and this process's id (SLURM_PROCID) from SLURM, and gives each task the GPU
# numbered SLURM_LOCALID. So: every task must see all of its node's GPUs (request them with
# --gres, NOT --gpus-per-task / --gpu-bind, which would leave each task one GPU renumbered 0).
# One task per node driving all its GPUs instead: --ntasks-per-node=1 and
# export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 (see docs/launch.md).
#
# WORKDIR and the dataset must be on storage every node can read (the same path everywhere):
# all processes write their part of each checkpoint there; process 0 writes TensorBoard logs and
# results.json.  Adjust the resources below to your cluster (partition, account, time, modules).
#SBATCH --job-name=avsiam-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=12
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err

set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_pretrain.sh CONFIG WORKDIR DATA_DIR [extra main.py flags]}
WORKDIR=${2:?workdir (shared storage) missing}
DATA_DIR=${3:?dataset directory (built with python -m data_prep.build) missing}
shift 3

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [[ -f .venv/bin/activate ]]; then source .venv/bin/activate; fi
mkdir -p "$WORKDIR"

# Optional: XLA GPU flags, e.g. for overlapping collectives with compute.
# export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"

echo "AVSiam: ${SLURM_NNODES} nodes x ${SLURM_NTASKS_PER_NODE:-?} tasks = ${SLURM_NTASKS} processes; workdir ${WORKDIR}"
# A job requeued after preemption resumes from the latest checkpoint in WORKDIR.
srun --kill-on-bad-exit=1 python main.py \
  --config="$CONFIG" \
  --workdir="$WORKDIR" \
  --config.data.dir="$DATA_DIR" \
  "$@"
