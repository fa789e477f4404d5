"""JAX/Flax generative models: FSDiT, the few-shot flow-matching DiT (docs/methods/fsdit.md)."""
