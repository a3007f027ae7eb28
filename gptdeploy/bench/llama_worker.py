"""The llama.cpp row, in its own process: `PYTHON path/to/llama_worker.py < job.json`.

PYTHON is the interpreter that has llama-cpp-python (`--llama-python`); it needs numpy and
llama_cpp, not gptdeploy: the plan runs this file by path, so `measure.py` beside it is imported
as a plain module and the row is timed by the same `measure` as every other row.

It drives llama.cpp through its C API (llama-cpp-python's ctypes layer), as llama-bench does,
not through `Llama.eval` (which keeps a Python copy of every logits row and, in the issue's
measurement, decoded Q4_0 at 220 tok/s where llama-bench gave 286): one `llama_batch` per step
with one sequence per batch row, `llama_decode`, `llama_get_logits_ith` and a numpy argmax
restricted to the tokenizer's vocabulary (the other rows restrict theirs the same way).
Model and context parameters are llama.cpp's defaults, which are llama-bench's: memory-mapped
weights, repacked CPU buffers, f16 KV cache, flash attention "auto"; the threads are the row's.
"""

from __future__ import annotations

import ctypes
import json
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

if __package__:  # imported as gptdeploy.bench.llama_worker (tests, tooling)
    from gptdeploy.bench.measure import Row, failed_row, measure
else:  # run by path under the llama-cpp-python interpreter, where gptdeploy need not exist
    from measure import Row, failed_row, measure  # type: ignore[no-redef]

KV_BYTES = 2  # llama.cpp's default KV cache type is f16 (llama_context_default_params().type_k)


class LlamaSession:
    """One model and one context with a sequence per batch row; closed by `close()`."""

    def __init__(self, gguf: str, threads: int, batch: int, positions: int, prompt_len: int):
        import llama_cpp.llama_cpp as C

        self.C = C
        C.llama_backend_init()
        mparams = C.llama_model_default_params()  # = llama-bench's: load_mode auto (mmap), repack on
        self.model = C.llama_model_load_from_file(gguf.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {gguf}")
        cparams = C.llama_context_default_params()  # flash_attn auto, f16 KV, no_perf: llama-bench's
        cparams.n_seq_max = batch  # one sequence (and, not unified, one KV stream) per batch row
        cparams.n_ctx = batch * positions
        cparams.n_batch = cparams.n_ubatch = max(512, batch * prompt_len)  # a prefill is one ubatch
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = C.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            C.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp cannot make a context of {cparams.n_ctx} positions for {gguf}")
        self.n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.model))
        self.batch = C.llama_batch_init(max(batch * prompt_len, batch), 0, 1)

    def precision(self) -> str:
        """The GGUF's weight type as llama.cpp names it: "gpt2 0.1B Q4_0" -> "q4_0", "... all F32" -> "f32",
        "... Q4_K - Medium" -> "q4_k_medium"."""
        buf = ctypes.create_string_buffer(128)
        self.C.llama_model_desc(self.model, buf, len(buf))
        ftype = buf.value.decode(errors="replace").split(maxsplit=2)[-1].lower()  # after arch and size
        return ftype.removeprefix("all ").replace(" - ", "_")

    def kv_bytes(self, batch: int, positions: int) -> int:
        C, m = self.C, self.model
        head_dim = C.llama_model_n_embd(m) // C.llama_model_n_head(m)
        return batch * positions * C.llama_model_n_layer(m) * 2 * C.llama_model_n_head_kv(m) * head_dim * KV_BYTES

    def clear(self) -> None:
        self.C.llama_memory_clear(self.C.llama_get_memory(self.ctx), True)

    def decode(self, rows: list[list[int]], pos0: int, vocab: int) -> np.ndarray:
        """Feed rows[r] to sequence r at positions pos0...; the greedy next id of each row, (B,)."""
        b, C = self.batch, self.C
        n = len(rows[0])
        i = 0
        for seq, ids in enumerate(rows):
            for k, token in enumerate(ids):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos0 + k, 1, k == n - 1
                b.seq_id[i][0] = seq
                i += 1
        b.n_tokens = i
        rc = C.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = np.empty(len(rows), dtype=np.int64)
        for seq in range(len(rows)):  # the output of row `seq` is its last token in the batch
            logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, (seq + 1) * n - 1), shape=(self.n_vocab,))
            out[seq] = logits[:vocab].argmax()  # greedy within the tokenizer's vocabulary
        return out

    def close(self) -> None:
        C = self.C
        C.llama_batch_free(self.batch)
        C.llama_free(self.ctx)
        C.llama_model_free(self.model)
        C.llama_backend_free()


def run_llama(job: dict) -> Row:
    import llama_cpp

    ids = job["prompt_ids"]  # (B, T), every row of one length
    B, T, n, vocab = len(ids), len(ids[0]), job["new_tokens"], job["vocab"]
    gguf = job["gguf"]
    t0 = time.perf_counter()
    session = LlamaSession(gguf, job["threads"], B, T + n, T)
    try:
        if session.n_vocab < vocab:
            raise RuntimeError(f"{gguf} has {session.n_vocab} tokens, fewer than the tokenizer's {vocab}")
        precision = session.precision()
        row = Row(f"llama.cpp {precision} ({Path(gguf).name})", "llama.cpp", None, B, T, n, job["threads"],
                  bundle=gguf, precision=precision)
        row.load_s = time.perf_counter() - t0
        row.model_mb = (Path(gguf).stat().st_size + session.kv_bytes(B, T + n)) / 2**20
        row.info = f"llama-cpp-python {llama_cpp.__version__}; {llama_cpp.llama_print_system_info().decode().strip()}"

        def one_run() -> tuple[float, list[float], list[list[int]]]:
            session.clear()  # a fresh KV cache, as every other row's run starts with
            start = time.perf_counter()
            nxt = session.decode(ids, 0, vocab)
            ttft = time.perf_counter() - start
            tokens, times = [nxt], []
            for k in range(1, n):
                s = time.perf_counter()
                nxt = session.decode(nxt[:, None].tolist(), T + k - 1, vocab)
                times.append(time.perf_counter() - s)
                tokens.append(nxt)
            return ttft, times, np.stack(tokens, 1).tolist()

        return measure(row, one_run, job)
    finally:
        session.close()


def main() -> None:
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    job = json.loads(sys.stdin.read())
    try:
        row = run_llama(job)
    except Exception as exc:  # noqa: BLE001 - reported as the row's error, the run goes on
        row = failed_row(job, "llama.cpp", str(exc))
    print(json.dumps(asdict(row)))


if __name__ == "__main__":
    main()
