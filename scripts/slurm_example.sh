#!/bin/bash
# Train CLIP ViT-L-14 with FSDP on 2 nodes x 8 GPUs under SLURM; restarts after a failure and on requeue.
#
#   sbatch scripts/slurm_example.sh configs/clip/YOUR_CONFIG.yaml
#
# One torchrun per node (srun --ntasks-per-node=1); they meet through the c10d rendezvous on the first node.
# --max-restarts: a worker that dies (SIGKILL, out of memory, a lost GPU) makes every node's torchrun restart its
# workers, and `--resume auto` continues from the last checkpoint in out_dir at the same global batch (a fresh
# start when there is none yet). out_dir must be on a file system that every node sees: each rank writes its own
# shards of the checkpoint folder. SIGTERM (preemption, scancel) reaches every worker: each finishes its step,
# the checkpoint is written, and the job can be requeued (--requeue) to continue.
#SBATCH --job-name=clip-fsdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_example.sh CONFIG.yaml}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=29400

srun --kill-on-bad-exit=0 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$PORT" --rdzv_id "$SLURM_JOB_ID" \
    --max-restarts 3 \
    train.py --config "$CONFIG" --train.strategy=fsdp --train.precision=bf16 --resume auto
