"""The CPU wing: this engine's C kernels (`csrc/`) and everything that runs the model on them.

`build` compiles, verifies and loads the C library; `backend.CpuBackend` sends the model's operations to it
(`small_batch_matmul`, `prefill_matmul`, `attention`, `decode_blocks`); `decode_step` runs a whole decode step in one
C call; `bf16_linear` and `int8_linear` are the lower-precision linear layers (`packed` their common base), and
`huge_pages` places weights in 2 MiB pages. Nothing here imports the model at run time.
"""
