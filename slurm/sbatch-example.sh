#!/usr/bin/env bash
# ringctl as a plain sbatch job, for those who do not use submitit (`ringctl launch` does the
# same through submitit). One srun task per rank; each task composes the same Hydra config
# from the overrides given to sbatch and runs ringctl.job.run_job, which joins
# torch.distributed from SLURM's environment (MASTER_ADDR = the first node), plans the ring
# from the real node names and writes results.json to RINGCTL_JOB_FOLDER.
#
#   sbatch slurm/sbatch-example.sh +topology=2node launcher=slurm launcher.max_ranks_per_node=2
#
# The #SBATCH lines below must match the config: --nodes = topology.nodes, --ntasks-per-node
# = topology.ranks_per_node capped by launcher.max_ranks_per_node (checked before any rank
# starts). Run it from the repository (or set RINGCTL_PYTHON to the venv's python).
# On the dev cluster (slurm/dev-cluster up), first: export SLURM_CONF=... as `up` printed.
#
#SBATCH --job-name=ringctl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:10:00
#SBATCH --output=ringctl-%j.out
set -euo pipefail

PYTHON=${RINGCTL_PYTHON:-$(command -v python3)}
[ -x .venv/bin/python ] && [ -z "${RINGCTL_PYTHON:-}" ] && PYTHON=.venv/bin/python
export RINGCTL_JOB_FOLDER=${RINGCTL_JOB_FOLDER:-$PWD/runs/sbatch-$SLURM_JOB_ID}
mkdir -p "$RINGCTL_JOB_FOLDER"
# run_job reads SLURM's environment through submitit's helpers, which need these two
export SUBMITIT_EXECUTOR=slurm SUBMITIT_FOLDER=$RINGCTL_JOB_FOLDER

# Validate once, on the batch host: the same checks as `ringctl launch`, plus the allocation.
read -r -d '' CHECK <<'PY' || true
import os, sys
from ringctl.config import compose
from ringctl.launch import validate
res = validate(compose(sys.argv[1:]))
got = (int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS"]) // int(os.environ["SLURM_NNODES"]))
if got != (res.nodes, res.ranks_per_node):
    sys.exit(f"sbatch-example: the allocation is {got[0]} nodes x {got[1]} tasks, the config asks "
             f"{res.nodes} x {res.ranks_per_node}: change #SBATCH --nodes/--ntasks-per-node")
PY
"$PYTHON" -c "$CHECK" "$@"

# Every rank: the resolved config (as ringctl launch sends it) -> run_job.
read -r -d '' RUN <<'PY' || true
import sys
from dataclasses import asdict
from omegaconf import OmegaConf
from ringctl.config import compose
from ringctl.job import run_job
from ringctl.launch import validate
cfg = compose(sys.argv[1:])
payload = OmegaConf.to_container(cfg, resolve=True)
payload["resources"] = asdict(validate(cfg))
run_job(payload)
PY
srun --kill-on-bad-exit=1 "$PYTHON" -c "$RUN" "$@"
echo "results: $RINGCTL_JOB_FOLDER/results.json"
