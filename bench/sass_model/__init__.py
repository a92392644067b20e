"""Static SASS cost model of the lqlora CUDA kernels (bench/sass_cost_model.py is the CLI).

Layers, imports downward only: sass (text -> instructions, CFG, loops) -> analysis
(branch evaluation, block frequencies, per-pipe counts, single-warp latency) -> hw
(device constants and the time model) -> kernels (the per-kernel mapping table) -> paths
(what the op launches per M, bytes moved).
"""
