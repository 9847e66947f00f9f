#!/usr/bin/env python3
"""Peer decode-throughput benchmark for the Tramontane bench table.

Measures CPU decode throughput (generated tokens per second, summed over the
batch) of one Mixtral-shaped dummy model (random f32 weights) in:

  * Hugging Face transformers (MixtralForCausalLM, KV cache, greedy), and
  * llama.cpp through llama-cpp-python (a GGUF written here with the `gguf`
    package, architecture "llama" with MoE expert tensors, as llama.cpp loads
    Mixtral), decoded through the low-level llama_batch API.

For every batch size B: B sequences of PROMPT_LEN random tokens are prefilled
in one call, WARMUP_STEPS decode steps are run untimed, then `--steps` decode
steps (one token per sequence per step, greedy argmax of the logits) are
timed. tok/s = B * steps / elapsed.

Each peer runs in its own child process, so that a crash (or an out-of-memory
kill) in one of them is reported as {"error": "..."} and does not take the
other peer or the JSON line down. The last line of stdout is always exactly
one JSON object:

  {"transformers": {"version": "...", "1": tok_s, "8": ..., "32": ...},
   "llama.cpp":    {"version": "...", "1": tok_s, "8": ..., "32": ...}}

A peer that fails as a whole is {"error": "..."}; a single batch size that
fails is reported as {"error": "..."} under that key. Progress goes to stderr.
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


def report_contention(peer: str, b: int, watch: CpuWatch) -> None:
    o = watch.others()
    if o is None:
        return
    msg = f"{peer} B={b}: other processes used {o:.2f} CPUs during timing"
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
    if a.top_k > a.experts or a.steps < 1 or a.threads < 1:
        p.error("need 1 <= --top-k <= --experts, --steps >= 1, --threads >= 1")
    a.head_dim = a.hidden // a.heads
    return a


def expected_params(a) -> int:
    """Parameter count of the Mixtral shape (untied embeddings)."""
    hd = a.head_dim
    attn = a.hidden * (a.heads * hd) * 2 + a.hidden * (a.kv_heads * hd) * 2
    moe = a.experts * 3 * a.hidden * a.intermediate + a.experts * a.hidden
    norms = 2 * a.hidden
    return a.layers * (attn + moe + norms) + 2 * a.vocab * a.hidden + a.hidden


def prompt_tokens(a, batch: int, seed: int = 1234) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lo = N_SPECIAL + N_BYTE_TOKENS
    return rng.integers(lo, a.vocab, size=(batch, PROMPT_LEN)).tolist()


# --------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------


def run_transformers(a) -> dict:
    import torch
    import transformers
    from transformers import MixtralConfig, MixtralForCausalLM

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
    model = MixtralForCausalLM(cfg).to(torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    impl = []
    for attr in ("_attn_implementation", "_experts_implementation"):
        impl.append(f"{attr.strip('_')}={getattr(model.config, attr, '?')}")
    log(
        f"transformers {transformers.__version__} torch {torch.__version__}: built model in "
        f"{time.perf_counter() - t0:.1f}s, {n_params / 1e6:.1f} M params "
        f"(expected {expected_params(a) / 1e6:.1f} M), threads={torch.get_num_threads()}, "
        + ", ".join(impl)
    )
    if n_params != expected_params(a):
        raise RuntimeError(f"parameter count {n_params} != expected {expected_params(a)}")

    res: dict = {"version": f"{transformers.__version__} (torch {torch.__version__})"}
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
    return res


# --------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------


def gguf_name(a) -> str:
    return (
        f"mixbench-h{a.hidden}-nh{a.heads}-kv{a.kv_heads}-ff{a.intermediate}-l{a.layers}"
        f"-e{a.experts}-k{a.top_k}-v{a.vocab}-f32.gguf"
    )


def write_gguf(a, path: str) -> None:
    """Write a Mixtral-shaped f32 GGUF (arch "llama" + MoE tensors), streaming tensors."""
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
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

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

    f32 = np.dtype(np.float32)
    for name, shape in shapes:
        w.add_tensor_info(name, shape, f32, int(np.prod(shape)) * 4)
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
        w.write_tensor_data(t)
        del t
    w.close()


def ensure_gguf(a, workdir: str) -> str:
    path = os.path.join(workdir, gguf_name(a))
    if os.path.exists(path):
        log(f"llama.cpp: reusing cached {path}")
        return path
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".partial"
    t0 = time.perf_counter()
    log(f"llama.cpp: writing {path} ({expected_params(a) * 4 / 1e9:.2f} GB)")
    try:
        write_gguf(a, tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)  # only complete files are ever cached
    log(f"llama.cpp: wrote GGUF in {time.perf_counter() - t0:.1f}s")
    return path


def run_llamacpp(a) -> dict:
    import numpy as np

    workdir = a.workdir
    tmpdir = None
    if workdir is None:
        tmpdir = tempfile.mkdtemp(prefix="tramontane-peers-")
        workdir = tmpdir
    try:
        return _run_llamacpp(a, ensure_gguf(a, workdir), np)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
            log(f"llama.cpp: removed {tmpdir}")


def _run_llamacpp(a, model_path: str, np) -> dict:
    import llama_cpp as L

    version = f"{getattr(L, '__version__', '?')} (llama-cpp-python)"
    logs: list[str] = []

    @L.llama_log_callback
    def on_log(level, text, user_data):  # noqa: ARG001
        logs.append(text.decode("utf-8", errors="replace") if text else "")

    L.llama_log_set(on_log, ctypes.c_void_p(0))
    L.llama_backend_init()

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

    res: dict = {"version": version}
    try:
        for b in a.batch_list:
            try:
                tps, dt = _llamacpp_decode(L, np, a, model, b, n_vocab, logs)
                res[str(b)] = round(tps, 3)
                log(f"llama.cpp B={b}: {a.steps} steps in {dt:.2f}s -> {tps:.2f} tok/s")
            except Exception as e:  # noqa: BLE001 - report per batch size
                traceback.print_exc(file=sys.stderr)
                res[str(b)] = {"error": f"{type(e).__name__}: {e}"}
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


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


def child_main(a) -> int:
    t0 = time.perf_counter()
    try:
        res = run_transformers(a) if a._peer == "transformers" else run_llamacpp(a)
    except Exception as e:  # noqa: BLE001 - whole-peer failure
        traceback.print_exc(file=sys.stderr)
        res = {"error": f"{type(e).__name__}: {e}"}
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
        f"vocab={a.vocab} -> {expected_params(a) / 1e6:.1f} M params f32; batches={a.batch_list} "
        f"steps={a.steps} threads={a.threads} prompt={PROMPT_LEN} warmup={WARMUP_STEPS}"
    )
    out = {}
    for peer in PEERS:
        if a.only and a.only != peer:
            continue
        t0 = time.perf_counter()
        log(f"=== {PEER_KEY[peer]} ===")
        out[PEER_KEY[peer]] = run_peer(peer, argv, a.timeout)
        log(f"=== {PEER_KEY[peer]}: {time.perf_counter() - t0:.1f}s wall ===")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
