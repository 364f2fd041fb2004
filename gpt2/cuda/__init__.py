"""The CUDA wing: `triton_backend.TritonBackend` (the model's operations on this repo's Triton kernels) and
`decode_graph` (decode steps captured in CUDA graphs, and the pool that reuses them across calls)."""
