"""The GPU's SM count, from which launchers size their grids (and the count assumed off-GPU)."""

import functools

import torch

DEFAULT_SMS = 132  # an H100 / H200, assumed on the CPU (the interpreter) so that grids match a GPU's


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of device; DEFAULT_SMS off CUDA."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count
