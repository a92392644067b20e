"""The algorithms of LQ-LoRA (METHOD.md §2-4), on tensors and configs only (no nn layers):
the per-matrix decomposition, the diagonal Fisher, the cost profile and the ILP allocation.
Submodules are imported on first use: allocation pulls in highspy."""
