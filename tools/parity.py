"""Parity check for users who hold real DialoGPT weights: this engine against `transformers` on fixed chats.

    python tools/parity.py MODEL                      # run both, print per-layer and logit differences
    python tools/parity.py MODEL --save-reference ref.safetensors   # also save the reference outputs
    python tools/parity.py MODEL --reference ref.safetensors        # check later, no transformers needed

MODEL is anything `gpt2.load` accepts. The reference is `transformers.GPT2LMHeadModel`, loaded from MODEL
when it is a Hugging Face checkpoint directory (so conversion is checked too), otherwise built from the
engine's own weights (so the implementations are compared on identical weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import gpt2
from gpt2.chat import format_history
from gpt2.checkpoint import is_engine_dir
from gpt2.model import GPT2

CONVERSATIONS = [
    ["Does money buy happiness?"],
    ["Hi there, how are you today?", "I'm good, thanks! What are you up to?", "Just reading about transformers."],
    ["What is the best way to learn a new language?", "Practice every day.", "How long until I'm fluent?",
     "Depends on the language.", "Spanish, let's say."],
    ["Tell me a joke about cats <|endoftext|> and dogs."],
]
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
DEFAULT_ATOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}


def chat_prompts(model: GPT2) -> list[list[int]]:
    """Each conversation in DialoGPT's format: every turn followed by <|endoftext|>."""
    tok = model.tokenizer
    return [format_history([tok.encode(turn) for turn in conv], tok.eos_token_id) for conv in CONVERSATIONS]


@torch.inference_mode()
def engine_outputs(model: GPT2, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Residual stream after each block (the last one after ln_f, as transformers reports it) and logits."""
    hidden: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: hidden.append(out[0])) for block in model.h[:-1]]
    hooks.append(model.h[-1].register_forward_hook(lambda _m, _i, out: hidden.append(out[1])))
    try:
        logits = model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    out = {f"hidden.{i}": h.float() for i, h in enumerate(hidden)}
    out["logits"] = logits.float()
    return out


@torch.inference_mode()
def reference_outputs(source: str, model: GPT2, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    import transformers

    if (Path(source) / "config.json").is_file() and not is_engine_dir(source):
        ref = transformers.GPT2LMHeadModel.from_pretrained(source, dtype=model.dtype)
    else:
        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**model.config.to_dict()))
        state = {("transformer." + k): (v.t() if k.endswith(CONV1D_SUFFIXES) else v)
                 for k, v in model.state_dict().items()}
        ref.load_state_dict(state, strict=False)
        ref.tie_weights()
        ref.to(model.dtype)
    ref.eval().to(model.device)
    result = ref(ids, output_hidden_states=True)
    out = {f"hidden.{i}": h.float() for i, h in enumerate(result.hidden_states[1:])}
    out["logits"] = result.logits.float()
    return out


def compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float) -> bool:
    """Print each tensor's max-abs difference (layers scaled by the reference's magnitude) and pass/fail."""
    ok = True
    for name in sorted(ref, key=lambda n: (n == "logits", int(n.split(".")[1]) if "." in n else 0)):
        if name not in ours or ours[name].shape != ref[name].shape:
            print(f"{name:>10}: shape mismatch {tuple(ours.get(name, torch.empty(0)).shape)} vs {tuple(ref[name].shape)}")
            ok = False
            continue
        diff = (ours[name] - ref[name]).abs().max().item()
        scale = max(1.0, ref[name].abs().max().item())
        passed = diff <= atol * scale
        ok &= passed
        print(f"{name:>10}: max|diff| {diff:.3e}  (max|ref| {scale:.3g}, limit {atol * scale:.3e})  "
              f"{'ok' if passed else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a converted directory, a Hugging Face directory or file, or a hub id")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--reference", type=Path, help="check against reference outputs saved earlier")
    source.add_argument("--save-reference", type=Path, help="save the transformers outputs to this file")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=["torch", "triton"], default=None)
    parser.add_argument("--atol", type=float, help="max-abs limit, times max(1, max|ref|) (default by dtype)")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    try:
        model = gpt2.load(args.model, device=args.device, dtype=dtype, backend=args.backend)
    except (ValueError, OSError) as e:
        print(f"parity: error: {e}", file=sys.stderr)
        return 2
    atol = args.atol if args.atol is not None else DEFAULT_ATOL[dtype]
    try:
        saved = load_file(args.reference) if args.reference is not None else {}
    except (OSError, SafetensorError) as e:
        print(f"parity: error: cannot read the reference file {args.reference}: {e}", file=sys.stderr)
        return 2
    to_save: dict[str, torch.Tensor] = {}
    ok = True
    for i, prompt in enumerate(chat_prompts(model)):
        ids = torch.tensor([prompt], device=model.device)
        print(f"conversation {i}: {len(prompt)} tokens")
        if args.reference is not None:
            ref = {k.split("/", 1)[1]: v.to(model.device) for k, v in saved.items() if k.startswith(f"{i}/")}
            if not ref:
                print(f"parity: error: {args.reference} has no outputs for conversation {i}", file=sys.stderr)
                return 2
        else:
            ref = reference_outputs(args.model, model, ids)
            to_save.update({f"{i}/{k}": v.cpu().contiguous() for k, v in ref.items()})
        ok &= compare(engine_outputs(model, ids), ref, atol)
    if args.save_reference is not None:
        save_file(to_save, args.save_reference)
        print(f"saved the reference outputs to {args.save_reference}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
