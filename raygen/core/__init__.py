"""The bottom layer every other raygen module may use: atomic files, the cache directory, progress
lines, image grids, console filters and the contracts (task, method) the upper layers agree on.
Nothing here imports another raygen package (see docs/architecture.md)."""
