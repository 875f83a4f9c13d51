"""Needle retrieval in natural prose: facts of several forms hidden in offline documentation text, asked for by name
(`python -m benchmarks.prose_retrieval`)."""
