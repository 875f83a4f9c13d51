"""The Block-State Transformer as an out-of-tree vLLM model: its config, layers, SSM state pages and serving.
Its windowed attention runs on the MoA backend with a plan derived from its config (no plan file)."""
