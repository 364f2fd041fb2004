"""The GPT-2 network: learned absolute positions, pre-LN blocks, gelu_new MLP, lm_head tied to wte.

Parameter names follow the released checkpoints without the `transformer.` prefix; weights are in
nn.Linear layout ([out, in], the transpose of GPT-2's Conv1D). Fused operations go through `backend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .config import GPT2Config
from .dispatch import select_backend
from .generation import generate
from .kv_cache import ForwardStep, KVCache
from .scoring import score

if TYPE_CHECKING:
    from .backend import TorchBackend
    from .decoding import GenerateOutput
    from .tokenizer import Tokenizer


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matrix
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, step: ForwardStep, cache: KVCache | None,
                backend: TorchBackend, last_token_only: bool = False) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with last_token_only, (B, 1, C) at each row's last new token, whose query
        alone attends (the keys and values of the whole chunk are still computed and cached)."""
        B, T, C = x.shape
        qkv = backend.linear(x, self.c_attn).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        if cache is not None:
            cache.write(self.layer, k, v, step)
            k, v = cache.keys_values(self.layer, step)  # each (B, nh, S, hs)
        if last_token_only:
            q, step = step.last_new_token(q, 2), step.last_tokens  # q (B, nh, 1, hs)
        if k.dtype == q.dtype:
            y = backend.attention(q, k, v, step)  # (B, nh, T or 1, hs)
        else:  # a cache in another dtype (`gpt2.load(..., kv_dtype=...)`): its keys and values, rounded to it when
            # written, are widened to fp32 and attended in fp32, as the CPU's C decode steps read such a cache
            y = backend.attention(q.float(), k.float(), v.float(), step).to(q.dtype)
        y = y.transpose(1, 2).reshape(B, q.shape[2], C)
        return backend.linear(y, self.c_proj)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, backend: TorchBackend) -> torch.Tensor:
        return backend.linear(backend.linear_gelu(x, self.c_fc), self.c_proj)


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, residual: torch.Tensor, normed: torch.Tensor, next_norm: nn.LayerNorm, step: ForwardStep,
                cache: KVCache | None, backend: TorchBackend,
                last_token_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-LN block on the residual stream h, given normed = ln_1(h); returns (h', next_norm(h')).

        Each residual add is fused with the LayerNorm that follows it (ln_2 here, then the next block's
        ln_1 or ln_f), so the stream is read once per add. last_token_only: h' only at each row's last new
        token, (B, 1, C) (see `CausalSelfAttention.forward`).
        """
        attn_out = self.attn(normed, step, cache, backend, last_token_only)
        if last_token_only:
            residual = step.last_new_token(residual, 1)  # (B, 1, C)
        residual, normed = backend.add_layer_norm(attn_out, residual, self.ln_2.weight, self.ln_2.bias, self.ln_2.eps)
        mlp_out = self.mlp(normed, backend)
        return backend.add_layer_norm(mlp_out, residual, next_norm.weight, next_norm.bias, next_norm.eps)


def _embedding(rows: int, width: int) -> nn.Embedding:
    """nn.Embedding(rows, width) with its default N(0, 1) weights, left uninitialised on the meta device: `gpt2.load`
    builds the model there and assigns every weight, and initialising a meta tensor imports torch._dynamo (about 2.5 s
    and 140 MB of resident memory, docs/performance.md#gpt2memorypy-what-a-loaded-model-costs)."""
    weight = torch.empty(rows, width)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(rows, width, _weight=weight)


class GPT2(nn.Module):
    tokenizer: Tokenizer
    kv_dtype: torch.dtype | None = None  # the KV cache's dtype; None: the model's (`gpt2.load(..., kv_dtype=...)`)

    def __init__(self, config: GPT2Config, backend: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.wte = _embedding(config.vocab_size, config.n_embd)
        self.wpe = _embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head: nn.Module | None = None  # None: tied to wte (logits = h wte^T); quantize/packing set their own
        self.backend_name = backend
        self._backend: tuple[torch.device, TorchBackend] | None = None

    @property
    def backend(self) -> TorchBackend:
        """The fused-op implementation for the device the weights are on now (resolved on first use there)."""
        if self._backend is None or self._backend[0] != self.device:
            try:
                self._backend = (self.device, select_backend(self.backend_name, self.device))
            except AttributeError as e:
                # nn.Module.__getattr__ would answer an AttributeError escaping a property with "'GPT2' object has no
                # attribute 'backend'", hiding the real one.
                raise RuntimeError(f"choosing the backend failed: {type(e).__name__}: {e}") from e
        return self._backend[1]

    def set_backend(self, name: str | None) -> None:
        """Choose "torch", "triton", or None for the device's default; checked now, errors if it cannot run."""
        self.backend_name = name
        self._backend = None
        self.backend  # noqa: B018 - resolve now so a bad choice fails here, not at the first forward

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, n_new: list[int] | None = None,
                last_only: bool = False, hidden_only: bool = False) -> torch.Tensor:
        """Logits for a chunk of tokens.

        input_ids (B, T). Without a cache: a fresh causal forward, returns (B, T, vocab).
        With a cache: row b appends its first n_new[b] tokens (default T) at the positions after what it
        holds; the rest of the row is padding. last_only returns (B, vocab) at each row's last new token
        (rows with n_new 0 get the logits of a padded slot, to be ignored). hidden_only returns the
        final-LayerNorm states (..., n_embd) instead of logits, for callers that project only some positions.
        """
        self._check_input_ids(input_ids)
        B, T = input_ids.shape
        if cache is None:
            if T > self.config.n_positions:
                raise ValueError(f"sequence length {T} exceeds n_positions ({self.config.n_positions})")
            step = ForwardStep.build([0] * B, [T] * B, T, self.config.n_positions, input_ids.device)
        else:
            step = cache.begin([T] * B if n_new is None else list(n_new), T)
        out = self.forward_step(input_ids, step, cache, last_only, hidden_only)
        if cache is not None:
            cache.commit(step)
        return out

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse what the embedding lookup would fail on deep inside torch (or, on CUDA, with a device assert)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                                       torch.int32):
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, length) tensor of int64 or int32 token ids, got {shape}"
                             + (f" {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else ""))
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} is empty: give at least one row of at "
                             "least one token")
        low, high = input_ids.min().item(), input_ids.max().item()
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")

    def forward_step(self, input_ids: torch.Tensor, step: ForwardStep, cache: KVCache | None,
                     last_only: bool = False, hidden_only: bool = False) -> torch.Tensor:
        """`forward` over an already planned step; leaves the cache's row lengths to the caller.

        For a dense step of one token per row it does no host work that depends on tensor values,
        so a decode step can be captured in a CUDA graph (see `gpt2.cuda.decode_graph`).
        """
        B, T = input_ids.shape
        x = self.wte(input_ids) + self.wpe(step.positions)  # (B, T, C)
        backend = self.backend.for_step(step, B * T, input_ids.device)
        first = self.h[0].ln_1
        normed = backend.layer_norm(x, first.weight, first.bias, first.eps)
        if not backend.decode_blocks(self, x, normed, step, cache):  # a CPU fp32 decode step: all blocks in one call
            # Only the last tokens' outputs are wanted: the last block's attention and MLP run on those alone
            # (one layer's c_proj and MLP, 3/4 of its weights' work, saved over the rest of a prompt).
            for i, block in enumerate(self.h):
                next_norm = self.h[i + 1].ln_1 if i + 1 < len(self.h) else self.ln_f
                last_token_only = last_only and T > 1 and i + 1 == len(self.h)
                x, normed = block(x, normed, next_norm, step, cache, backend, last_token_only)
        if last_only:
            normed = normed[:, -1]  # (B, C): the last block left one token per row
        if hidden_only:
            return normed  # (B, [T,] C)
        return self.project(normed)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) from final-LayerNorm states (..., n_embd) through the lm_head (wte, or its own copy)."""
        return self.backend.linear(hidden, self.wte if self.lm_head is None else self.lm_head)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for batch_size rows of up to max_len tokens, in `kv_dtype` or the model's dtype."""
        return KVCache(self.config, batch_size, max_len, self.device, self.kv_dtype or self.dtype)

    def generate(self, prompts: list[list[int]] | torch.Tensor, **kwargs: Any) -> list[list[int]] | GenerateOutput:
        """New tokens for each prompt (or a `GenerateOutput` with return_dict=True); see `gpt2.generation.generate`."""
        return generate(self, prompts, **kwargs)

    def score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """Log-likelihood of each continuation given its context; see `gpt2.scoring.score`."""
        return score(self, contexts, continuations)
