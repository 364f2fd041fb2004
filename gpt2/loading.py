"""`load`: a ready-to-run GPT2 from an engine directory, a Hugging Face directory, a weights file or a hub id.

A hub id (`owner/name`, not an existing path) is fetched with huggingface_hub into its cache (honouring
HF_HUB_OFFLINE), converted once into the engine cache ($GPT2_ENGINE_CACHE, default
~/.cache/dialogpt-engine/<owner>--<name>/<revision>) and loaded from there afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, CheckpointStream, is_engine_dir, stream_checkpoint
from .convert import DestinationExistsError, convert
from .cpu.bf16_linear import pack_bf16, why_not_packable
from .cpu.huge_pages import huge_page_empty
from .cpu.int8_linear import BLOCK_LINEARS, Int8Linear, quantize_lm_head, why_not_quantizable
from .dispatch import select_backend
from .model import GPT2
from .paths import engine_cache_dir
from .process_memory import return_freed_buffers, reuse_freed_buffers, trim_allocator
from .tokenizer import tokenizer_for

HUB_FILES = ["config.json", "vocab.json", "merges.txt"]  # fetched with the weights
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANTIZATIONS = (None, "int8")


class ModelNotFoundError(CheckpointError):
    """Neither a local path nor a hub id that could be fetched."""


def load(path_or_hub_id: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         backend: str | None = None, quantize: str | None = None, kv_dtype: torch.dtype | None = None,
         packed_prefill: bool = False) -> GPT2:
    """The model (eval mode, on device, in dtype) with its tokenizer set as `model.tokenizer`.

    quantize="int8": int8 linear layers on the CPU (`gpt2.cpu.int8_linear`), for an fp32 model.
    dtype=torch.bfloat16 on a CPU with native bf16 (avx512_bf16, AMX) runs the linear layers on this engine's bf16
    kernels and oneDNN (`gpt2.cpu.bf16_linear`): about 2x faster than fp32 per decode step and per prefill.
    kv_dtype: the KV cache's dtype, by default the model's; torch.bfloat16 or torch.float16 halve an fp32 or int8
    model's cache (CPU only). Each key and value is rounded to it as it is written, and attention reads them widened
    to fp32. A generation's decode steps of 1-16 rows still run in one C call (`gpt2.cpu.decode_step`; fp16 where the
    CPU converts it: AVX-512, or AVX2 with F16C), reading half the bytes of an fp32 cache, which at long context is
    what a step reads besides the weights; prefills, `model(...)` and a bf16 model over another cache dtype run
    torch's ops.
    packed_prefill: with bf16 or int8 on the CPU, keep a second copy of each linear weight in oneDNN's (bf16) or
    fbgemm's (int8) packed layout, which prefills faster; without it each weight is held once
    (docs/performance.md#gpt2memorypy-what-a-loaded-model-costs).

    The checkpoint is read one tensor at a time, each put in its final place (converted, quantized) before the next
    is read, so the load holds little more than the model at any moment.
    """
    if dtype not in _LOAD_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; choose torch.float16, torch.bfloat16 or torch.float32")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {QUANTIZATIONS}")
    if kv_dtype is not None and kv_dtype not in _LOAD_DTYPES:
        raise ValueError(f"kv_dtype {kv_dtype} is not supported; choose None (the model's dtype), torch.float32, "
                         "torch.bfloat16 or torch.float16")
    if packed_prefill and quantize is None and dtype != torch.bfloat16:
        raise ValueError("packed_prefill=True applies to dtype=torch.bfloat16 or quantize='int8' on the CPU; "
                         f"this load is {dtype} without quantize")
    device = _check_device(device)
    if kv_dtype not in (None, dtype) and device.type != "cpu":
        raise ValueError(f"kv_dtype={kv_dtype} differs from dtype={dtype}, which only the CPU runs; on {device} "
                         "leave kv_dtype=None")
    # a backend or quantization that cannot run fails here, before the weights are read, not mid-generation
    backend_name = select_backend(backend, device).name
    if quantize == "int8" and (reason := why_not_quantizable(device, dtype, backend_name)) is not None:
        raise ValueError(reason)
    path = Path(path_or_hub_id)
    if not path.exists():
        if not (isinstance(path_or_hub_id, str) and _HUB_ID.fullmatch(path_or_hub_id)):
            raise ModelNotFoundError(f"{path_or_hub_id}: no such file or directory (and not a hub id of the form "
                                     "owner/name). Give a converted directory (`gpt2 convert SRC DST`), a Hugging "
                                     "Face checkpoint directory or weights file, or a hub id")
        path = _engine_dir_for_hub_id(path_or_hub_id)
    if device.type == "cpu":
        return_freed_buffers()  # staging buffers unmapped when freed, not left between the tensors kept
    stream = stream_checkpoint(path)
    with torch.device("meta"):  # no memory, no init: every parameter is assigned from the checkpoint below
        model = GPT2(stream.config)
    _place_weights(model, stream, device, dtype, quantize, packed_prefill)
    model.set_backend(backend)
    if quantize == "int8":
        quantize_lm_head(model, packed_prefill)
    elif why_not_packable(model) is None:  # bf16 on a CPU with native bf16, torch backend
        pack_bf16(model, packed_prefill)
    model.kv_dtype = kv_dtype
    model.tokenizer = tokenizer_for(path)
    trim_allocator()  # the load's freed staging memory back to the system
    if device.type == "cpu":
        reuse_freed_buffers()  # a forward's activations from the memory the last one freed, not mapped afresh
    return model.eval()


@torch.no_grad()
def _place_weights(model: GPT2, stream: CheckpointStream, device: torch.device, dtype: torch.dtype,
                   quantize: str | None, packed_prefill: bool) -> None:
    """Assign each of the stream's tensors to model (built on the meta device) as it is read: copied into fresh
    memory on device in dtype (2 MiB pages on the CPU, `gpt2.cpu.huge_pages`), or with quantize="int8" each block
    linear made `Int8Linear` from the file's tensors as soon as its weight and bias are in; then the file's pages of
    the tensors used are let go of (`CheckpointStream.release`)."""
    int8_linears = {f"h.{i}.{path}" for i in range(model.config.n_layer) for path in BLOCK_LINEARS} if quantize else set()
    for name, value in stream.tensors:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if module_name in int8_linears:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)  # the file's, until quantized
            if any(param.is_meta for param in module.parameters()):
                continue  # its weight waits for its bias
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, Int8Linear(module.weight, module.bias, packed_prefill))
            stream.release(module.weight)
            stream.release(module.bias)
            continue
        placed = (huge_page_empty(tuple(value.shape), dtype).copy_(value) if device.type == "cpu"
                  else value.to(device=device, dtype=dtype, copy=True))
        module._parameters[attr] = nn.Parameter(placed)
        stream.release(value)


def _check_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available on this machine")
    return device


def _engine_dir_for_hub_id(repo_id: str) -> Path:
    snapshot = _download(repo_id)
    target = engine_cache_dir() / repo_id.replace("/", "--") / snapshot.name
    if not is_engine_dir(target):
        try:
            convert(snapshot, target)
        except DestinationExistsError:  # another process converted it meanwhile
            if not is_engine_dir(target):
                raise
    return target


def _download(repo_id: str) -> Path:
    """The hub snapshot directory holding repo_id's config, tokenizer files and weights (safetensors preferred)."""
    from huggingface_hub import constants, snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "model.safetensors"]))
        if not (snapshot / "model.safetensors").is_file():
            snapshot = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "pytorch_model.bin"]))
    except Exception as e:  # huggingface_hub reports network, offline and not-found cases as many types
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        download = ("no download (HF_HUB_OFFLINE=1)" if constants.is_offline_mode()
                    else "a download from the Hugging Face hub")
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local path, and fetching it from the Hugging Face hub failed. Tried: the hub "
            f"cache {constants.HF_HUB_CACHE}, then {download} ({reason}). To use a checkpoint you have as files, "
            "convert it: `gpt2 convert SRC DST && gpt2 chat DST` on the command line, or `gpt2 convert SRC DST` "
            "then `gpt2.load(DST)` in Python."
        ) from None
    if not any((snapshot / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise ModelNotFoundError(f"{repo_id!r}: the hub snapshot {snapshot} has neither model.safetensors nor "
                                 "pytorch_model.bin; convert a local checkpoint with `gpt2 convert SRC DST` instead")
    return snapshot
