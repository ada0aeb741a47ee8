"""Mixture of experts from dense fine-tunes: router weights (`gates`), the pass that fills a plan's routers
(`routers.prepare_routers(plan)`) and the in-memory inputs the engine reads them from (`sources`). The tensor
mapping and the plan live in `lazymerge.planner.moe`, the router description in `lazymerge.planner.moe_routers`.

Nothing is imported here: the planner imports `sources`, and must not load the router pass with it."""
