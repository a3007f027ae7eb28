"""Make a random-init SmolLM-135M-shaped Llama (30 layers, 576 wide, 9 heads, 3 KV heads, MLP 1536,
vocab 49152, tied embeddings) and, optionally, its bundle: the second shape the CPU performance
notes are measured on (grouped-query attention and RoPE, where GPT-2-124M has neither).

    python samples/make_smollm_135m.py --out out/smollm-135m --no-bundle   # HF dir: out/smollm-135m/source
    python samples/make_smollm_135m.py --out out/smollm-135m --precision int4 --no-attentions

The shape and numerics are SmolLM-135M's config.json (HuggingFaceTB/SmolLM-135M: rope_theta
10000, rms_norm_eps 1e-5, 2048 positions, bos = eos = 0); the weights are transformers' own
random init, seeded. The tokenizer is the sample's byte-level BPE, as for make_gpt2_124m.py: its
2048 ids are a subset of the model's 49152 rows, which is all a benchmark needs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from make_gpt2_124m import parser, save_source

SHAPE = {  # SmolLM-135M's config.json, as transformers' LlamaConfig names it
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
}


def make_source(out: Path, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return save_source(LlamaForCausalLM(LlamaConfig(**SHAPE)).eval(), out)


def main() -> None:
    ap = parser(__doc__, "out/smollm-135m", "export the fused graph (no attention outputs)")
    ap.add_argument("--precision", choices=("fp32", "int8", "int4"), default="fp32")
    args = ap.parse_args()

    source = make_source(args.out / "source", args.seed)
    print(f"source: {source}")
    if args.no_bundle:
        return
    from gptdeploy.exporters.export import export_bundle

    t0 = time.perf_counter()
    result = export_bundle(source, args.out / "bundle", force=True, precision=args.precision,
                           attentions=not args.no_attentions)
    graph = result.bundle.manifest.parity[result.bundle.graph().name]["graph"]
    print(json.dumps({
        "bundle": str(result.bundle.path),
        "export_wall_s": round(time.perf_counter() - t0, 1),
        "fusion": graph.get("fusion", {}),
        "passed": result.parity.passed,
    }, indent=2))


if __name__ == "__main__":
    main()
