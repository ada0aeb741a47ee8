"""Mixture of experts from dense fine-tunes: router weights (`gates`) and the in-memory inputs the engine reads
them from (`sources`). The tensor mapping and the plan live in `lazymerge.planner.moe`."""
