"""Mixture of experts from dense fine-tunes: router weights (`gates`) and the pass that fills a plan's routers
(`routers.prepare_routers(plan)`). The tensor mapping and the plan live in `lazymerge.planner.moe`, the router
description in `lazymerge.planner.moe_routers`, the in-memory inputs the engine reads routers and expert noise from
in `lazymerge.planner.moe_sources` (the planner builds them; they import nothing above it).

Nothing is imported here: importing the package must not load the router pass (it runs a model)."""
