"""Reading released GPT-2 / DialoGPT checkpoints into this engine's config and weight layout.

Sources: a Hugging Face directory (config.json + model.safetensors or pytorch_model.bin), a directory
written by `gpt2 convert` (marked by ENGINE_FORMAT), or a single weights file (.safetensors, or a
torch.save pickle such as Microsoft's original `*_ft.pkl`). Pickles are read with weights_only=True,
so a file that would run code is refused. Names are normalised (`module.` / `transformer.` prefixes,
`lm_head.decoder.weight`), causal-mask buffers dropped, the tied lm_head checked against wte, and
GPT-2's Conv1D weights ([in, out]) transposed to nn.Linear layout ([out, in]). The model size comes
from the tensor shapes and is checked against any config given; every problem is a CheckpointError
naming the file and the key. Weights holding NaN or inf are read, with a NonFiniteWeightsWarning naming them.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .config import ConfigError, GPT2Config
from .file_pages import FileMapping

ENGINE_FORMAT = "dialogpt-engine"  # safetensors metadata "format" and config.json "engine_format" of our layout
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
N_HEAD_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # the released GPT-2 sizes
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LM_HEAD = ("lm_head.weight", "lm_head.decoder.weight")
_LAYER = re.compile(r"h\.(\d+)\.")
_UNSAFE_PICKLE = re.compile(r"Unsupported global: GLOBAL (\S+)|unrecognized function|Unsupported class")


class CheckpointError(ValueError):
    """A checkpoint this engine cannot read; the message names the file and, where one is at fault, the key."""


class CheckpointNotFoundError(CheckpointError):
    """The path does not exist, or a directory holds no weights file."""


class CorruptCheckpointError(CheckpointError):
    """A truncated or corrupt file, or one that is not a state dict of tensors."""


class UnsafePickleError(CheckpointError):
    """A pickle that would import or call code when loaded; refused without running it."""


class MissingKeyError(CheckpointError):
    """Weights the model needs are absent."""


class UnexpectedKeyError(CheckpointError):
    """Tensors that are not part of a GPT-2 language model (or two names for the same weight)."""


class TensorShapeError(CheckpointError):
    """A tensor whose shape does not fit the model size."""


class TensorDtypeError(CheckpointError):
    """A tensor that does not hold floating-point weights."""


class ConfigMismatchError(CheckpointError):
    """The config disagrees with the tensors, or the size cannot be inferred from them."""


class TiedWeightsError(CheckpointError):
    """An lm_head weight different from the token embedding (this engine ties them)."""


class NonFiniteWeightsWarning(UserWarning):
    """Tensors holding NaN or inf: the checkpoint is read, but the model will compute NaN or inf from them."""


def engine_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every key of the engine state dict with its shape, in order."""
    C, shapes = config.n_embd, {}
    shapes["wte.weight"] = (config.vocab_size, C)
    shapes["wpe.weight"] = (config.n_positions, C)
    for i in range(config.n_layer):
        for name, shape in (
            ("ln_1.weight", (C,)), ("ln_1.bias", (C,)),
            ("attn.c_attn.weight", (3 * C, C)), ("attn.c_attn.bias", (3 * C,)),
            ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
            ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
            ("mlp.c_fc.weight", (4 * C, C)), ("mlp.c_fc.bias", (4 * C,)),
            ("mlp.c_proj.weight", (C, 4 * C)), ("mlp.c_proj.bias", (C,)),
        ):
            shapes[f"h.{i}.{name}"] = shape
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    return shapes


def is_engine_dir(path: str | Path) -> bool:
    """Whether path is a directory written by `convert` (its config.json carries the engine marker)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("engine_format") == ENGINE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_symlink_loop(path: str | Path) -> bool:
    """Whether following path's symbolic links never ends (a loop, or more links in a row than the system follows)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def read_checkpoint(src: str | Path, *, preset: str | None = None, config: str | Path | GPT2Config | None = None,
                    progress: bool = False) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """The config and engine-layout state dict of a checkpoint directory or weights file, every tensor contiguous.

    preset / config override a directory's config.json; without any, the size is inferred from the shapes.
    """
    stream = stream_checkpoint(src, preset=preset, config=config)
    bar = tqdm(stream.tensors, desc="converting", unit="tensor", total=len(engine_shapes(stream.config)),
               disable=None if progress else True)
    return stream.config, {name: value.contiguous() for name, value in bar}


@dataclass
class CheckpointStream:
    """A checkpoint's config and its tensors one at a time (`stream_checkpoint`)."""

    config: GPT2Config
    # (name, tensor) in `engine_shapes` order and the engine layout: a transposed view where the file holds GPT-2's
    # Conv1D layout, so not always contiguous
    tensors: Iterator[tuple[str, torch.Tensor]]
    # drops a tensor's resident pages of the mapped weights file (`gpt2.file_pages`); nothing for other tensors
    release: Callable[[torch.Tensor], None]


def stream_checkpoint(src: str | Path, *, preset: str | None = None,
                      config: str | Path | GPT2Config | None = None) -> CheckpointStream:
    """`read_checkpoint`'s config, checked against every tensor's name, dtype and shape before any is read, and its
    tensors one at a time, so that a load can put each in its place and `release` its file pages before reading
    the next: the file's pages of a tensor or two resident at a time instead of the whole file's.
    """
    weights, given = _weights_and_config(Path(src), preset, config)
    raw, engine_layout = read_weights_file(weights)
    cfg, origin = given if given is not None else (None, None)
    release = FileMapping(weights).release
    cfg, tensors = engine_tensors(raw, source=str(weights), config=cfg, config_origin=origin,
                                  engine_layout=engine_layout, release=release)
    return CheckpointStream(cfg, tensors, release)


def _weights_and_config(src: Path, preset: str | None, config: str | Path | GPT2Config | None,
                        ) -> tuple[Path, tuple[GPT2Config, str] | None]:
    """The weights file of src (a directory or a file) and the config given or found beside it, with its origin."""
    given = _given_config(preset, config)
    if src.is_dir():
        weights = next((src / name for name in WEIGHTS_FILES if (src / name).is_file()), None)
        if weights is None:
            found = ", ".join(sorted(p.name for p in src.iterdir())) or "nothing"
            raise CheckpointNotFoundError(f"{src}: no {' or '.join(WEIGHTS_FILES)} in this directory (found: {found})")
        if given is None and (src / "config.json").is_file():
            given = (GPT2Config.from_json(src / "config.json"), str(src / "config.json"))
        return weights, given
    if src.is_file():
        return src, given
    if is_symlink_loop(src):
        raise CheckpointNotFoundError(f"checkpoint not found: {src} is a symlink loop (following its links never "
                                      "reaches a file or directory)")
    raise CheckpointNotFoundError(f"checkpoint not found: {src} (no such file or directory)")


def _given_config(preset: str | None, config: str | Path | GPT2Config | None) -> tuple[GPT2Config, str] | None:
    if preset is not None and config is not None:
        raise ConfigError("give either a preset or a config, not both")
    if preset is not None:
        return GPT2Config.from_preset(preset), f"preset {preset!r}"
    if isinstance(config, GPT2Config):
        return config, "the given config"
    if config is not None:
        return GPT2Config.from_json(config), str(config)
    return None


def read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The raw tensors of a safetensors or torch.save file, and whether it is marked as the engine layout."""
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        return _read_safetensors(path)
    return _read_pickle(path), False


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
    return tensors, metadata.get("format") == ENGINE_FORMAT


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        unsafe = _UNSAFE_PICKLE.search(str(e))
        if unsafe:
            what = unsafe.group(1) or "a function or class"
            raise UnsafePickleError(
                f"{path}: refused to load: this pickle asks for {what}, which a file of weights never needs, and "
                "could run code when loaded. Only pickles holding plain tensors are read."
            ) from None
        raise CorruptCheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
                                     f"({_reason(e)})") from None
    except Exception as e:  # torch.load reports damage as many exception types
        raise CorruptCheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
                                     f"({_reason(e)})") from None
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(f"{path}: key {key!r} holds a {type(value).__name__}, "
                                         "expected a state dict mapping names to tensors")
    return dict(obj)


def _reason(e: BaseException) -> str:
    """The informative part of a torch.load error: its first sentence, or the unpickler's own complaint."""
    text = str(e)
    inner = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = inner.group(1) if inner else lines[0] if lines else ""
    first = first.split(". ")[0][:200] or ("unexpected end of file" if isinstance(e, EOFError) else "no details")
    return f"{type(e).__name__}: {first}"


def to_engine_state_dict(raw: Mapping[str, torch.Tensor], *, source: str, config: GPT2Config | None = None,
                         config_origin: str | None = None, engine_layout: bool = False,
                         ) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """Normalise a raw GPT-2 state dict (HF, Microsoft or engine naming) into (config, engine state dict), every
    tensor contiguous; see `engine_tensors` for the arguments."""
    cfg, tensors = engine_tensors(raw, source=source, config=config, config_origin=config_origin,
                                  engine_layout=engine_layout)
    return cfg, {name: value.contiguous() for name, value in tensors}


def engine_tensors(raw: Mapping[str, torch.Tensor], *, source: str, config: GPT2Config | None = None,
                   config_origin: str | None = None, engine_layout: bool = False,
                   release: Callable[[torch.Tensor], None] | None = None,
                   ) -> tuple[GPT2Config, Iterator[tuple[str, torch.Tensor]]]:
    """The config of a raw GPT-2 state dict (HF, Microsoft or engine naming), and its tensors one at a time in the
    engine's names, order and layout.

    Every name, dtype and shape is checked, and the config checked against them (described by config_origin) or
    inferred from them when None, before this returns: a bad checkpoint fails before any tensor is used. source
    names the file in errors; engine_layout says the weights are already [out, in]; otherwise the layout is read
    from the shape of h.0.attn.c_attn.weight. release, where given, lets go of the pages of the tensors read to
    check them (a separate lm_head against wte, see `stream_checkpoint`). Tensors holding NaN or inf are warned
    about (NonFiniteWeightsWarning) once all have been read.
    """
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}  # engine name -> name in the file
    lm_heads: list[tuple[str, torch.Tensor]] = []
    for key, value in raw.items():
        name = key.removeprefix("module.").removeprefix("transformer.")
        if name in _LM_HEAD:
            lm_heads.append((key, value))
        elif not _MASK_BUFFER.fullmatch(name):
            if name in names:
                raise UnexpectedKeyError(f"{source}: keys {names[name]!r} and {key!r} are both the weight {name!r}")
            if value.dtype not in FLOAT_DTYPES:
                raise TensorDtypeError(f"{source}: key {key!r} holds {value.dtype} values; expected floating-point "
                                       "weights (float16, bfloat16 or float32)")
            tensors[name], names[name] = value, key

    def shown(name: str) -> str:  # a missing key as the file would name it
        some = next(iter(names.items()), None)
        return (some[1][: len(some[1]) - len(some[0])] if some else "") + name

    for name in ("wte.weight", "wpe.weight"):
        if name not in tensors:
            raise MissingKeyError(f"{source}: missing key {shown(name)!r}; is this a GPT-2 checkpoint?")
        if tensors[name].dim() != 2:
            raise TensorShapeError(f"{source}: key {names[name]!r} has shape {tuple(tensors[name].shape)}, "
                                   "expected a matrix (rows, n_embd)")
    cfg = _check_or_infer_config(tensors, names, source, config, config_origin or "the config")

    expected = engine_shapes(cfg)
    missing = [shown(name) for name in expected if name not in tensors]
    if missing:
        raise MissingKeyError(f"{source}: missing {len(missing)} key(s): {_some(missing)}")
    unexpected = [names[name] for name in tensors if name not in expected]
    if unexpected:
        raise UnexpectedKeyError(f"{source}: unexpected key(s), not part of a GPT-2 language model: {_some(unexpected)}")

    c_attn = tensors["h.0.attn.c_attn.weight"]
    linear = engine_layout or tuple(c_attn.shape) == expected["h.0.attn.c_attn.weight"]
    transposed = {name for name in expected if not linear and name.endswith(CONV1D_WEIGHTS)}
    for name, shape in expected.items():
        value = tensors[name]
        stored = shape[::-1] if name in transposed else shape
        if tuple(value.shape) != stored:
            layout = (" (Conv1D layout [in, out])" if name in transposed
                      else " ([out, in])" if name.endswith(CONV1D_WEIGHTS) else "")
            raise TensorShapeError(f"{source}: key {names[name]!r} has shape {tuple(value.shape)}, expected "
                                   f"{stored}{layout} for n_embd={cfg.n_embd}")
    wte = tensors["wte.weight"]
    for key, value in lm_heads:
        if value.shape != wte.shape or not _same_values(value.to(wte.dtype), wte):
            raise TiedWeightsError(f"{source}: {key!r} differs from {names['wte.weight']!r}; this engine ties the "
                                   "output layer to the token embedding and cannot run untied weights")
        if release is not None:
            release(value)
    if release is not None and lm_heads:
        release(wte)
    return cfg, _in_engine_layout(tensors, names, expected, transposed, source)


def _in_engine_layout(tensors: dict[str, torch.Tensor], names: dict[str, str], expected: dict[str, tuple[int, ...]],
                      transposed: set[str], source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """`engine_tensors`' tensors, checked shapes and all, one at a time (see there)."""
    non_finite: list[str] = []  # "'key' (count of size)" for each tensor holding NaN or inf
    for name in expected:
        value = tensors[name]
        if holds_non_finite(value):
            count = value.numel() - int(torch.isfinite(value).sum())
            non_finite.append(f"{names[name]!r} ({count} of {value.numel()} values)")
        yield name, value.t() if name in transposed else value
    if non_finite:
        more = f" and {len(non_finite) - 6} more" if len(non_finite) > 6 else ""
        warnings.warn(f"{source}: {len(non_finite)} tensor(s) hold NaN or inf: {', '.join(non_finite[:6])}{more}; "
                      "the model will compute NaN or inf from them (is the checkpoint damaged, or saved after "
                      "training diverged?)", NonFiniteWeightsWarning, stacklevel=2)


def holds_non_finite(value: torch.Tensor) -> bool:
    """Whether value holds NaN or inf (False for meta tensors): min and max propagate both, in one pass that
    allocates no temporary tensor, where torch.isfinite(value).all() allocates one of value's size and is much slower
    (docs/performance.md#gpt2checkpointpy-the-non-finite-check)."""
    if value.is_meta or value.numel() == 0:
        return False
    low, high = torch.aminmax(value)
    return not bool(torch.isfinite(low) & torch.isfinite(high))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal elementwise, NaN matching NaN (torch.equal alone would call a tied wte holding NaN untied)."""
    return torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def _check_or_infer_config(tensors: dict[str, torch.Tensor], names: dict[str, str], source: str,
                           config: GPT2Config | None, origin: str) -> GPT2Config:
    vocab, width = tensors["wte.weight"].shape
    positions = tensors["wpe.weight"].shape[0]
    layers = 1 + max((int(m.group(1)) for name in tensors if (m := _LAYER.match(name))), default=-1)
    if layers == 0:
        raise MissingKeyError(f"{source}: no transformer blocks (keys 'h.0.*'); is this a GPT-2 checkpoint?")
    if config is None:
        if width not in N_HEAD_BY_WIDTH:
            raise ConfigMismatchError(
                f"{source}: n_embd={width} is not a released GPT-2 size, so the number of attention heads cannot be "
                "inferred from the tensor shapes; give a config (--config FILE) or a preset (--preset NAME)"
            )
        return GPT2Config(n_embd=width, n_layer=layers, n_head=N_HEAD_BY_WIDTH[width], n_positions=positions,
                          vocab_size=vocab)
    for name, want, have in (
        ("wte.weight", (config.vocab_size, config.n_embd), (vocab, width)),
        ("wpe.weight", (config.n_positions, config.n_embd), (positions, tensors["wpe.weight"].shape[1])),
    ):
        if want != have:
            raise ConfigMismatchError(
                f"{origin} (n_embd={config.n_embd}, vocab_size={config.vocab_size}, n_positions={config.n_positions}) "
                f"expects key {names[name]!r} of shape {want}, but {source} has {have}; the config does not match "
                "the weights (omit it to infer the size from the weights, or give the right --preset / --config)"
            )
    if config.n_layer != layers:
        raise ConfigMismatchError(
            f"{origin} says n_layer={config.n_layer}, but {source} holds {layers} blocks (h.0 to h.{layers - 1}); "
            "the config does not match the weights"
        )
    return config


def _some(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
