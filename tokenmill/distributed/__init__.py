"""Process groups for tensor parallelism: torch.distributed (gloo on CPU, NCCL on CUDA)
behind the few collectives a sharded model calls, and the group a model is built for."""
