# Sourced by the sbatch scripts: everything below the user's settings. Needs CONFIG set.
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}}
cd "$REPO"
PY=${PYTHON:-python3}

# The run's output directory, from the experiment config (and its overrides)
OUTPUT_DIR=$($PY -c 'import sys; from dsee_scale.experiment import load_experiment as l; print(l(sys.argv[1], sys.argv[2:]).output_dir)' "$CONFIG" ${OVERRIDES:-})
mkdir -p "$OUTPUT_DIR/logs"
LOG="$OUTPUT_DIR/logs/slurm-${SLURM_JOB_ID:-local}-${SLURM_RESTART_COUNT:-0}.log"
exec > >(tee -a "$LOG") 2>&1

# Rendezvous: the first node of the allocation, a port derived from the job id (every node
# computes the same one without talking to the others)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export MASTER_ADDR MASTER_PORT

# The DeepSpeed hostfile of this allocation (on the shared output directory): one
# "host slots=N" line per node, as `dsee-scale hostfile` writes it (no Python start here)
HOSTFILE="$OUTPUT_DIR/logs/hostfile-${SLURM_JOB_ID:-local}"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=${GPUS_PER_NODE:-1}/" > "$HOSTFILE"
export HOSTFILE

# Requeue-friendly: a job that finds a complete checkpoint continues from it
RESUME=""
if [ -f "$OUTPUT_DIR/checkpoints/latest" ]; then
  RESUME="--resume"
fi
echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_JOB_NUM_NODES:-1} node(s) x ${GPUS_PER_NODE:-?}," \
     "master $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR ${RESUME:+(resuming)}"
