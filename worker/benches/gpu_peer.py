#!/usr/bin/env python3
"""transformers decode throughput on the GPU, the peer in gpu-bench's table.

Builds a MistralForCausalLM of the given shapes with random weights, directly on
the GPU in the given dtype, and for every batch size B: prefills B random
prompts of --prompt-len tokens in one call, runs WARMUP_STEPS decode steps
untimed, then times --steps decode steps (one token per sequence per step,
greedy argmax, the model's KV cache). tok/s = B * steps / elapsed.

The last line of stdout is one JSON object:
  {"transformers": {"version": "...", "torch": "...", "1": tok_s, "8": ...}}
with {"error": "..."} in place of a number (or of the whole entry) on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

WARMUP_STEPS = 3


def log(msg: str) -> None:
    print(f"[gpu-peer] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    return p.parse_args()


def run(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers import MistralConfig, MistralForCausalLM

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    config = MistralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=32768,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = MistralForCausalLM(config)
    model.eval()
    log(f"{torch.cuda.get_device_name()}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, {args.dtype}")
    result: dict = {"version": transformers.__version__, "torch": torch.__version__}
    for b in (int(x) for x in args.batches.split(",")):
        try:
            ids = torch.randint(3, args.vocab, (b, args.prompt_len), device="cuda")
            with torch.inference_mode():
                out = model(input_ids=ids, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(WARMUP_STEPS):
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(args.steps):
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
            result[str(b)] = b * args.steps / elapsed
            log(f"batch {b}: {result[str(b)]:.1f} tok/s")
            del out, past, nxt
            torch.cuda.empty_cache()
        except Exception as e:  # one batch size failing keeps the others
            traceback.print_exc()
            result[str(b)] = {"error": f"{type(e).__name__}: {e}"}
    return result


def main() -> None:
    args = parse_args()
    try:
        peer = run(args)
    except Exception as e:
        traceback.print_exc()
        peer = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps({"transformers": peer}), flush=True)


if __name__ == "__main__":
    main()
