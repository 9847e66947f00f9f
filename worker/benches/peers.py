#!/usr/bin/env python3
"""Peer decode-throughput benchmark for the Tramontane bench table.

Measures CPU decode throughput (generated tokens per second, summed over the
batch) of one Mixtral-shaped dummy model (random weights) in:

  * Hugging Face transformers (MixtralForCausalLM, KV cache, greedy), and
  * llama.cpp through llama-cpp-python (a GGUF written here with the `gguf`
    package, architecture "llama" with MoE expert tensors, as llama.cpp loads
    Mixtral), decoded through the low-level llama_batch API.

For every batch size B: B sequences of PROMPT_LEN random tokens are prefilled
in one call, WARMUP_STEPS decode steps are run untimed, then `--steps` decode
steps (one token per sequence per step, greedy argmax of the logits) are
timed. tok/s = B * steps / elapsed. With `--prefill-len N`, the prefill of one
N-token prompt (one forward / one llama_decode call in one ubatch, fresh KV
cache) is timed too, best of PREFILL_ROUNDS: tok/s = N / elapsed.

`--precision` sets the weights' precision (default f32):

  precision   transformers          llama.cpp GGUF
  f32         float32               F32
  f16, bf16   bfloat16              F16 (norms and router F32, as llama.cpp's
                                    converter writes it)
  q8_0        skipped ({"error"})   Q8_0, quantized from the F16 GGUF by
                                    llama_model_quantize (as llama-quantize does)

bf16 is what Mistral checkpoints hold and torch's 2-byte CPU type; F16 is
llama.cpp's. Every type holds the same random values (rounded). With
`--workdir`, GGUFs are cached there under names keyed by shape and type.

Each peer runs in its own child process, so that a crash (or an out-of-memory
kill) in one of them is reported as {"error": "..."} and does not take the
other peer or the JSON line down. The last line of stdout is always exactly
one JSON object:

  {"transformers": {"version": "...", "precision": "bf16", "weights": "BF16",
                    "1": tok_s, "8": ..., "32": ..., "prefill": tok_s},
   "llama.cpp":    {"version": "...", "precision": "bf16", "weights": "F16",
                    "1": tok_s, "8": ..., "32": ..., "prefill": tok_s}}

"precision" is the --precision asked for, "weights" the type that ran (for
llama.cpp, the file type llama.cpp reports for the GGUF); "prefill" is there
only with --prefill-len. A peer that fails as a whole, or is skipped, is
{"error": "...", "precision": ...}; a single batch size (or the prefill) that
fails is reported as {"error": "..."} under its key. Progress goes to stderr.
The script exits 0 whenever it could print that line.

Requirements: worker/benches/peers-requirements.txt.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

PROMPT_LEN = 8
WARMUP_STEPS = 2
INIT_STD = 0.02
ROPE_THETA = 1e6
RMS_EPS = 1e-5
N_SPECIAL = 3  # <unk>, <s>, </s>
N_BYTE_TOKENS = 256  # <0x00> .. <0xFF>, SentencePiece byte fallback
PEERS = ("transformers", "llamacpp")
PRECISIONS = ("f32", "f16", "bf16", "q8_0")
# The GGUF type llama.cpp runs for each --precision: bf16 runs as F16, llama.cpp's usual
# 2-byte CPU type.
GGUF_TYPE = {"f32": "f32", "f16": "f16", "bf16": "f16", "q8_0": "q8_0"}
PREFILL_ROUNDS = 2
_LOG_CALLBACKS: list = []
PEER_KEY = {"transformers": "transformers", "llamacpp": "llama.cpp"}


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


class CpuWatch:
    """Share of the machine's CPU that *other* processes used during a timed window.

    Timings on a shared machine are only meaningful when this stays small; a
    warning is logged when it does not. Linux only (reads /proc/stat)."""

    def __init__(self):
        self.t0 = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = sum(v[:8]) - v[3] - v[4]  # all but idle and iowait
            own = os.times()
            return busy, own.user + own.system, time.perf_counter()
        except (OSError, ValueError, IndexError):
            return None

    def others(self) -> float | None:
        """CPUs' worth of time used by other processes, averaged over the window."""
        t1 = self._sample()
        if self.t0 is None or t1 is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (t1[0] - self.t0[0]) / hz
        own = t1[1] - self.t0[1]
        wall = t1[2] - self.t0[2]
        return max(0.0, busy - own) / wall if wall > 0 else None


def report_contention(peer: str, b: int | str, watch: CpuWatch) -> None:
    o = watch.others()
    if o is None:
        return
    what = f"B={b}" if isinstance(b, int) else b
    msg = f"{peer} {what}: other processes used {o:.2f} CPUs during timing"
    if o > 0.15:
        log("WARNING: " + msg + " -- this number is perturbed")
    else:
        log(msg)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["transformers", "llamacpp"], default=None)
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="f32",
        help="weight precision of the peers: transformers runs f32, or bf16 for f16/bf16 "
        "(skipped for q8_0); llama.cpp's GGUF is F32, F16 for f16/bf16, or Q8_0 "
        "(quantized from the F16 GGUF by llama.cpp's own quantizer)",
    )
    p.add_argument(
        "--prefill-len",
        type=int,
        default=0,
        help="also time the prefill of one prompt of this many tokens (best of "
        f"{PREFILL_ROUNDS}), reported as \"prefill\" tok/s; 0 skips it",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="where the GGUF is written and cached (kept); default: a temporary "
        "directory that is removed at the end",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per peer")
    p.add_argument("--_peer", choices=list(PEERS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.batch_list = [int(x) for x in a.batches.split(",") if x.strip()]
    if not a.batch_list or any(b < 1 for b in a.batch_list):
        p.error("--batches must be a comma-separated list of positive integers")
    if a.hidden % a.heads or a.heads % a.kv_heads:
        p.error("--hidden must be a multiple of --heads, --heads a multiple of --kv-heads")
    if a.vocab < N_SPECIAL + N_BYTE_TOKENS + 1:
        p.error(f"--vocab must be at least {N_SPECIAL + N_BYTE_TOKENS + 1}")
    if a.top_k > a.experts or a.steps < 1 or a.threads < 1 or a.prefill_len < 0:
        p.error("need 1 <= --top-k <= --experts, --steps >= 1, --threads >= 1, --prefill-len >= 0")
    a.head_dim = a.hidden // a.heads
    return a


def expected_params(a) -> int:
    """Parameter count of the Mixtral shape (untied embeddings)."""
    hd = a.head_dim
    attn = a.hidden * (a.heads * hd) * 2 + a.hidden * (a.kv_heads * hd) * 2
    moe = a.experts * 3 * a.hidden * a.intermediate + a.experts * a.hidden
    norms = 2 * a.hidden
    return a.layers * (attn + moe + norms) + 2 * a.vocab * a.hidden + a.hidden


def prompt_tokens(a, batch: int, seed: int = 1234, length: int = PROMPT_LEN) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lo = N_SPECIAL + N_BYTE_TOKENS
    return rng.integers(lo, a.vocab, size=(batch, length)).tolist()


def prefill_prompt(a) -> list[int]:
    """The one --prefill-len-token prompt whose prefill is timed (same for every peer)."""
    return prompt_tokens(a, 1, seed=4321, length=a.prefill_len)[0]


# --------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------


def run_transformers(a) -> dict:
    if a.precision == "q8_0":
        # torch's CPU int8 paths (torch.ao dynamic quantization, torchao) cover nn.Linear
        # at best, not the fused 3-D expert tensors of transformers' Mixtral, and
        # bitsandbytes' 8-bit path needs a GPU: there is no like-for-like Q8_0 run.
        return {
            "error": "skipped: transformers has no 8-bit CPU weight path for Mixtral's experts",
            "precision": a.precision,
        }

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, MixtralConfig

    # f16 runs as bf16 too: Mistral's checkpoints are bf16, and bf16 is torch's 2-byte CPU type.
    dtype = torch.float32 if a.precision == "f32" else torch.bfloat16
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        num_local_experts=a.experts,
        num_experts_per_tok=a.top_k,
        max_position_embeddings=4096,
        rms_norm_eps=RMS_EPS,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
    )
    t0 = time.perf_counter()
    # As from_pretrained(..., dtype=...) builds a checkpoint's model.
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    wdtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    impl = []
    for attr in ("_attn_implementation", "_experts_implementation"):
        impl.append(f"{attr.strip('_')}={getattr(model.config, attr, '?')}")
    log(
        f"transformers {transformers.__version__} torch {torch.__version__}: built model in "
        f"{time.perf_counter() - t0:.1f}s, {n_params / 1e6:.1f} M params "
        f"(expected {expected_params(a) / 1e6:.1f} M), weights {'/'.join(wdtypes)}, "
        f"threads={torch.get_num_threads()}, " + ", ".join(impl)
    )
    if type(model).__name__ != "MixtralForCausalLM":
        raise RuntimeError(f"built {type(model).__name__}, not MixtralForCausalLM")
    if n_params != expected_params(a):
        raise RuntimeError(f"parameter count {n_params} != expected {expected_params(a)}")
    if wdtypes != [str(dtype).removeprefix("torch.")]:
        raise RuntimeError(f"weights are {wdtypes}, want {dtype}")

    res: dict = {
        "version": f"{transformers.__version__} (torch {torch.__version__})",
        "precision": a.precision,
        "weights": {"float32": "F32", "bfloat16": "BF16"}.get(wdtypes[0], wdtypes[0]),
    }
    for b in a.batch_list:
        try:
            ids = torch.tensor(prompt_tokens(a, b), dtype=torch.long)
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
                t_start = None
                for i in range(WARMUP_STEPS + a.steps):
                    if i == WARMUP_STEPS:
                        watch = CpuWatch()
                        t_start = time.perf_counter()
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
                dt = time.perf_counter() - t_start
            if past.get_seq_length() != PROMPT_LEN + WARMUP_STEPS + a.steps:
                raise RuntimeError(f"KV cache length {past.get_seq_length()} is wrong")
            tps = b * a.steps / dt
            res[str(b)] = round(tps, 3)
            log(f"transformers B={b}: {a.steps} steps in {dt:.2f}s -> {tps:.2f} tok/s")
            report_contention("transformers", b, watch)
            del out, past
        except Exception as e:  # noqa: BLE001 - report per batch size
            traceback.print_exc(file=sys.stderr)
            res[str(b)] = {"error": f"{type(e).__name__}: {e}"}
    if a.prefill_len:
        try:
            res["prefill"] = round(_transformers_prefill(a, torch, model), 3)
        except Exception as e:  # noqa: BLE001 - reported under its key
            traceback.print_exc(file=sys.stderr)
            res["prefill"] = {"error": f"{type(e).__name__}: {e}"}
    return res


def _transformers_prefill(a, torch, model) -> float:
    """tok/s of one --prefill-len-token prompt's prefill (one forward, fresh KV cache), best
    of PREFILL_ROUNDS."""
    ids = torch.tensor([prefill_prompt(a)], dtype=torch.long)
    best = float("inf")
    for r in range(PREFILL_ROUNDS):
        with torch.no_grad():
            watch = CpuWatch()
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            out.logits[:, -1, :].argmax(-1)
            dt = time.perf_counter() - t0
        if out.past_key_values.get_seq_length() != a.prefill_len:
            raise RuntimeError(f"KV cache length {out.past_key_values.get_seq_length()} is wrong")
        del out
        best = min(best, dt)
        log(f"transformers prefill {a.prefill_len} tokens, round {r + 1}: {dt:.2f}s -> {a.prefill_len / dt:.2f} tok/s")
        report_contention("transformers", f"prefill round {r + 1}", watch)
    return a.prefill_len / best


# --------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------


def gguf_name(a, gtype: str) -> str:
    """Cache file name: the shape and the GGUF type (f32, f16 or q8_0)."""
    return (
        f"mixbench-h{a.hidden}-nh{a.heads}-kv{a.kv_heads}-ff{a.intermediate}-l{a.layers}"
        f"-e{a.experts}-k{a.top_k}-v{a.vocab}-{gtype}.gguf"
    )


def gguf_gb(a, gtype: str) -> float:
    """Approximate file size (the big tensors' bytes per weight)."""
    return expected_params(a) * {"f32": 4, "f16": 2, "q8_0": 34 / 32}[gtype] / 1e9


def keeps_f32(name: str, ndim: int) -> bool:
    """Tensors that llama.cpp's converter (convert_hf_to_gguf.py) leaves in F32 in an F16
    GGUF: 1-D tensors, norms and the MoE router (ffn_gate_inp); llama.cpp's quantizer
    leaves the same ones unquantized."""
    return ndim <= 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight")


def write_gguf(a, path: str, gtype: str = "f32") -> None:
    """Write a Mixtral-shaped GGUF (arch "llama" + MoE tensors), streaming tensors: all F32
    (gtype "f32"), or F16 but for the tensors keeps_f32 names (gtype "f16"). The F16 values
    are the F32 file's values rounded, so every type runs the same model."""
    import gguf
    import numpy as np

    H, hd, V, I, E = a.hidden, a.head_dim, a.vocab, a.intermediate, a.experts
    # Tensor shapes in numpy (row-major) order; ggml's ne[] is the reverse.
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (V, H))]
    for i in range(a.layers):
        p = f"blk.{i}."
        shapes += [
            (p + "attn_norm.weight", (H,)),
            (p + "attn_q.weight", (a.heads * hd, H)),
            (p + "attn_k.weight", (a.kv_heads * hd, H)),
            (p + "attn_v.weight", (a.kv_heads * hd, H)),
            (p + "attn_output.weight", (H, a.heads * hd)),
            (p + "ffn_norm.weight", (H,)),
            (p + "ffn_gate_inp.weight", (E, H)),
            (p + "ffn_gate_exps.weight", (E, I, H)),
            (p + "ffn_up_exps.weight", (E, I, H)),
            (p + "ffn_down_exps.weight", (E, H, I)),
        ]
    shapes += [("output_norm.weight", (H,)), ("output.weight", (V, H))]
    total = sum(int(np.prod(s)) for _, s in shapes)
    if total != expected_params(a):
        raise RuntimeError(f"GGUF tensor parameter count {total} != expected {expected_params(a)}")

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tramontane-mix-bench-dummy")
    w.add_context_length(4096)
    w.add_embedding_length(H)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(I)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_expert_count(E)
    w.add_expert_used_count(a.top_k)
    w.add_vocab_size(V)
    if gtype not in ("f32", "f16"):
        raise ValueError(f"write_gguf writes f32 or f16, not {gtype}")
    half = gtype == "f16"
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)

    # SentencePiece ("llama") vocab laid out like Mistral's: <unk>, <s>, </s>,
    # 256 byte-fallback tokens, then dummy pieces.
    n_rest = V - N_SPECIAL - N_BYTE_TOKENS
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(n_rest)]
    T = gguf.TokenType
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * n_rest
    scores = [0.0] * (N_SPECIAL + N_BYTE_TOKENS) + [-float(i) for i in range(n_rest)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def dtype_of(name, shape):
        return np.dtype(np.float16 if half and not keeps_f32(name, len(shape)) else np.float32)

    for name, shape in shapes:
        dt = dtype_of(name, shape)
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            t = np.ones(shape, dtype=np.float32)
        else:
            t = rng.standard_normal(shape, dtype=np.float32)
            t *= INIT_STD
        dt = dtype_of(name, shape)
        if t.dtype != dt:
            t = t.astype(dt)
        w.write_tensor_data(t)
        del t
    w.close()


def capture_llama_logs(L):
    """Routes llama.cpp's log into a list (returned with the callback, which the caller keeps
    alive) and initialises the backend."""
    logs: list[str] = []

    @L.llama_log_callback
    def on_log(level, text, user_data):  # noqa: ARG001
        logs.append(text.decode("utf-8", errors="replace") if text else "")

    L.llama_log_set(on_log, ctypes.c_void_p(0))
    L.llama_backend_init()
    return logs, on_log


def quantize_gguf(a, src: str, dst: str, gtype: str) -> None:
    """Quantize GGUF `src` into `dst` with llama.cpp's own quantizer (llama_model_quantize,
    as the llama-quantize tool calls it: default parameters, the target ftype, --threads)."""
    import llama_cpp as L

    ftype = {"q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0}[gtype]
    logs, on_log = capture_llama_logs(L)
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = a.threads
    rc = L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    _LOG_CALLBACKS.append(on_log)  # llama.cpp keeps the pointer until the next llama_log_set
    out = "".join(logs)
    for line in out.splitlines():
        if re.search(r"model size|quant size|- type\s", line):
            log("  llama.cpp quantize| " + line.strip())
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}:\n" + out[-2000:])


def ensure_gguf(a, workdir: str, gtype: str) -> str:
    """The cached GGUF of this shape and type, written (f32, f16) or quantized from the
    F16 one (q8_0, as llama.cpp's converter + llama-quantize make one) when missing."""
    path = os.path.join(workdir, gguf_name(a, gtype))
    if os.path.exists(path):
        log(f"llama.cpp: reusing cached {path}")
        return path
    src = ensure_gguf(a, workdir, "f16") if gtype == "q8_0" else None
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".partial"
    t0 = time.perf_counter()
    log(f"llama.cpp: {'quantizing' if src else 'writing'} {path} ({gguf_gb(a, gtype):.2f} GB)")
    try:
        if src:
            quantize_gguf(a, src, tmp, gtype)
        else:
            write_gguf(a, tmp, gtype)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)  # only complete files are ever cached
    log(f"llama.cpp: {'quantized' if src else 'wrote'} GGUF in {time.perf_counter() - t0:.1f}s")
    return path


def run_llamacpp(a) -> dict:
    import numpy as np

    workdir = a.workdir
    tmpdir = None
    if workdir is None:
        tmpdir = tempfile.mkdtemp(prefix="tramontane-peers-")
        workdir = tmpdir
    try:
        return _run_llamacpp(a, ensure_gguf(a, workdir, GGUF_TYPE[a.precision]), np)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
            log(f"llama.cpp: removed {tmpdir}")


def _run_llamacpp(a, model_path: str, np) -> dict:
    import llama_cpp as L

    version = f"{getattr(L, '__version__', '?')} (llama-cpp-python)"
    logs, on_log = capture_llama_logs(L)

    mparams = L.llama_model_default_params()
    t0 = time.perf_counter()
    model = L.llama_model_load_from_file(model_path.encode(), mparams)
    load_log = "".join(logs)
    if not model:
        raise RuntimeError("llama_model_load_from_file failed:\n" + load_log[-2000:])
    n_params = L.llama_model_n_params(model)
    log(
        f"llama-cpp-python {version}: loaded in {time.perf_counter() - t0:.1f}s, "
        f"{n_params / 1e6:.1f} M params (expected {expected_params(a) / 1e6:.1f} M)"
    )
    for line in load_log.splitlines():
        if re.search(
            r"print_info: (arch|file type|n_embd|n_layer|n_head\w*|n_ff|n_expert\w*|n_vocab|"
            r"model type|model params|vocab type)\b|CPU_REPACK|model buffer size",
            line,
        ):
            log("  llama.cpp| " + line.strip())
    sysinfo = L.llama_print_system_info()
    log("  llama.cpp| system_info: " + (sysinfo.decode() if sysinfo else "?").strip())

    # The MoE path must be in use: hparams say so and the expert tensors loaded.
    def hp(key: str):
        m = re.search(rf"print_info: {key}\s*=\s*(\d+)", load_log)
        return int(m.group(1)) if m else None

    got = (hp("n_expert"), hp("n_expert_used"))
    if got != (a.experts, a.top_k):
        raise RuntimeError(f"llama.cpp reports (n_expert, n_expert_used) = {got}, want ({a.experts}, {a.top_k})")
    if n_params != expected_params(a):
        raise RuntimeError(f"llama.cpp parameter count {n_params} != expected {expected_params(a)}")

    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    if n_vocab != a.vocab:
        raise RuntimeError(f"llama.cpp vocab {n_vocab} != {a.vocab}")

    # The weight type that runs: the file type llama.cpp reports, checked against the
    # tensors' own types (the most common one must be the GGUF type asked for).
    m = re.search(r"print_info: file type\s*=\s*(.+)", load_log)
    weights = m.group(1).strip().removeprefix("all ") if m else "?"  # "all F32" -> "F32"
    counts = {t: int(n) for t, n in re.findall(r"- type\s+(\w+):\s+(\d+) tensors", load_log)}
    log(f"  llama.cpp| weights {weights}; tensors by type: {counts}")
    want = GGUF_TYPE[a.precision]
    if not counts or max(counts, key=counts.get) != want:
        raise RuntimeError(f"the GGUF's tensors are {counts}, want mostly {want}")

    res: dict = {"version": version, "precision": a.precision, "weights": weights}
    try:
        for b in a.batch_list:
            try:
                tps, dt = _llamacpp_decode(L, np, a, model, b, n_vocab, logs)
                res[str(b)] = round(tps, 3)
                log(f"llama.cpp B={b}: {a.steps} steps in {dt:.2f}s -> {tps:.2f} tok/s")
            except Exception as e:  # noqa: BLE001 - report per batch size
                traceback.print_exc(file=sys.stderr)
                res[str(b)] = {"error": f"{type(e).__name__}: {e}"}
        if a.prefill_len:
            try:
                res["prefill"] = round(_llamacpp_prefill(L, np, a, model, n_vocab, logs), 3)
            except Exception as e:  # noqa: BLE001 - reported under its key
                traceback.print_exc(file=sys.stderr)
                res["prefill"] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        L.llama_model_free(model)
        L.llama_backend_free()
    return res


def _llamacpp_decode(L, np, a, model, b: int, n_vocab: int, logs: list[str]):
    per_seq = PROMPT_LEN + WARMUP_STEPS + a.steps + 8
    per_seq = (per_seq + 255) // 256 * 256
    n_batch = max(512, b * PROMPT_LEN)

    cparams = L.llama_context_default_params()
    cparams.n_ctx = per_seq * b
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch
    cparams.n_seq_max = b
    cparams.n_threads = a.threads
    cparams.n_threads_batch = a.threads
    cparams.no_perf = False
    n_log = len(logs)
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed:\n" + "".join(logs[n_log:])[-2000:])
    if b == a.batch_list[0]:
        for line in "".join(logs[n_log:]).splitlines():
            if re.search(r"llama_context: (n_ctx|n_batch|n_ubatch|n_seq_max|flash_attn|kv_unified)", line):
                log("  llama.cpp| " + line.strip())
    batch = L.llama_batch_init(b * PROMPT_LEN, 0, 1)
    try:

        def submit(entries):
            # entries: (token, pos, seq, want_logits)
            for i, (tok, pos, seq, want) in enumerate(entries):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = want
            batch.n_tokens = len(entries)
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

        def greedy(indices):
            out = []
            for i in indices:
                ptr = L.llama_get_logits_ith(ctx, i)
                out.append(int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax()))
            return out

        prompts = prompt_tokens(a, b)
        entries = []
        last_idx = []
        for s, toks in enumerate(prompts):
            for p, tok in enumerate(toks):
                entries.append((tok, p, s, p == PROMPT_LEN - 1))
            last_idx.append(len(entries) - 1)
        submit(entries)
        nxt = greedy(last_idx)
        pos = PROMPT_LEN
        t_start = None
        for i in range(WARMUP_STEPS + a.steps):
            if i == WARMUP_STEPS:
                watch = CpuWatch()
                t_start = time.perf_counter()
            submit([(nxt[s], pos, s, True) for s in range(b)])
            nxt = greedy(range(b))
            pos += 1
        dt = time.perf_counter() - t_start
        report_contention("llama.cpp", b, watch)
        return b * a.steps / dt, dt
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def _llamacpp_prefill(L, np, a, model, n_vocab: int, logs: list[str]) -> float:
    """tok/s of one --prefill-len-token prompt's prefill, best of PREFILL_ROUNDS: the whole
    prompt in one llama_decode call and one ubatch (as Tramontane prefills it in one step),
    logits for the last token only, the KV cache cleared between rounds."""
    n = a.prefill_len
    cparams = L.llama_context_default_params()
    cparams.n_ctx = (n + 8 + 255) // 256 * 256
    cparams.n_batch = n
    cparams.n_ubatch = n
    cparams.n_seq_max = 1
    cparams.n_threads = a.threads
    cparams.n_threads_batch = a.threads
    n_log = len(logs)
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed:\n" + "".join(logs[n_log:])[-2000:])
    batch = L.llama_batch_init(n, 0, 1)
    try:
        for i, tok in enumerate(prefill_prompt(a)):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n - 1
        batch.n_tokens = n
        best = float("inf")
        for r in range(PREFILL_ROUNDS):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            watch = CpuWatch()
            t0 = time.perf_counter()
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            # Reading the logits waits for the computation to finish.
            np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, n - 1), shape=(n_vocab,)).argmax()
            dt = time.perf_counter() - t0
            best = min(best, dt)
            log(f"llama.cpp prefill {n} tokens, round {r + 1}: {dt:.2f}s -> {n / dt:.2f} tok/s")
            report_contention("llama.cpp", f"prefill round {r + 1}", watch)
        return n / best
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


def child_main(a) -> int:
    t0 = time.perf_counter()
    try:
        res = run_transformers(a) if a._peer == "transformers" else run_llamacpp(a)
    except Exception as e:  # noqa: BLE001 - whole-peer failure
        traceback.print_exc(file=sys.stderr)
        res = {"error": f"{type(e).__name__}: {e}", "precision": a.precision}
    log(f"{PEER_KEY[a._peer]}: done in {time.perf_counter() - t0:.1f}s")
    with open(a._result, "w") as f:
        json.dump(res, f)
    return 0


def run_peer(peer: str, argv: list[str], timeout: float) -> dict:
    fd, result_path = tempfile.mkstemp(prefix=f"tramontane-peers-{peer}-", suffix=".json")
    os.close(fd)
    os.unlink(result_path)
    try:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_peer", peer, "--_result", result_path]
        # The child's stdout goes to our stderr: only the final JSON line is ours.
        proc = subprocess.run(cmd, stdout=sys.stderr, timeout=timeout)
        if os.path.exists(result_path):
            with open(result_path) as f:
                return json.load(f)
        return {"error": f"peer process exited with status {proc.returncode} without a result"}
    except subprocess.TimeoutExpired:
        return {"error": f"peer process timed out after {timeout:.0f}s"}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if os.path.exists(result_path):
            os.unlink(result_path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a._peer:
        return child_main(a)
    log(
        f"shape: hidden={a.hidden} heads={a.heads} kv_heads={a.kv_heads} head_dim={a.head_dim} "
        f"intermediate={a.intermediate} layers={a.layers} experts={a.experts} top_k={a.top_k} "
        f"vocab={a.vocab} -> {expected_params(a) / 1e6:.1f} M params; precision={a.precision} "
        f"(llama.cpp GGUF {GGUF_TYPE[a.precision]}); batches={a.batch_list} steps={a.steps} "
        f"threads={a.threads} prompt={PROMPT_LEN} warmup={WARMUP_STEPS} prefill={a.prefill_len}"
    )
    out = {}
    for peer in PEERS:
        if a.only and a.only != peer:
            continue
        t0 = time.perf_counter()
        log(f"=== {PEER_KEY[peer]} ===")
        res = run_peer(peer, argv, a.timeout)
        res.setdefault("precision", a.precision)  # also on a crash or timeout
        out[PEER_KEY[peer]] = res
        log(f"=== {PEER_KEY[peer]}: {time.perf_counter() - t0:.1f}s wall ===")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
