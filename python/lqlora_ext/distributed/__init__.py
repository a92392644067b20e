"""Running lqlora_ext's work over several processes, GPUs and nodes with torch.distributed."""
