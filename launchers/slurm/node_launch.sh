#!/bin/bash
# Run by srun once per node: a deepspeed launcher (no ssh) that starts this node's ranks.
# DeepSpeed needs the hostfile (all nodes, slots each) to lay out the world; common.sh wrote it.
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --num_nodes "$SLURM_JOB_NUM_NODES" \
  --node_rank "$SLURM_NODEID" --num_gpus "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
