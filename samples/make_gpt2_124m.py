"""Make a random-init GPT-2-124M-shaped model (12 layers, 12 heads, 768, vocab 50257) and its bundle.

The headline numbers in the issues and notes are measured on this model, so anyone can
reproduce them without downloading weights:

    python samples/make_gpt2_124m.py --out out/gpt2-124m        # HF dir: out/gpt2-124m/source
                                                                # bundle: out/gpt2-124m/bundle
The tokenizer is the sample's byte-level BPE (GPT-2's own vocabulary cannot be downloaded
here); its ids are a subset of the model's 50257 rows, which is all a benchmark needs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

SAMPLE_TOKENIZER = Path(__file__).parent / "tiny-gpt" / "tokenizer.json"


def save_source(model, out: Path) -> Path:
    """Write a random-init transformers model to `out` as an HF directory, with the sample's tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(SAMPLE_TOKENIZER, out / "tokenizer.json")
    return out


def parser(doc: str, out: str, attentions_help: str) -> argparse.ArgumentParser:
    """The options every random-init model maker takes (make_smollm_135m.py adds its own)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bundle", action="store_true", help="only write the HF source directory")
    ap.add_argument("--no-attentions", action="store_true", help=attentions_help)
    return ap


def make_source(out: Path, seed: int) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    return save_source(GPT2LMHeadModel(config).eval(), out)


def main() -> None:
    args = parser(__doc__, "out/gpt2-124m", "export the graph without attention outputs").parse_args()

    source = make_source(args.out / "source", args.seed)
    print(f"source: {source}")
    if args.no_bundle:
        return
    from gptdeploy.exporters.export import export_bundle

    t0 = time.perf_counter()
    result = export_bundle(source, args.out / "bundle", force=True, attentions=not args.no_attentions)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    size_mb = sum(p.stat().st_size for p in result.bundle.path.iterdir()) / 1e6
    p = result.parity
    print(json.dumps({
        "bundle": str(result.bundle.path),
        "export_wall_s": round(wall, 1),
        "peak_rss_mb_whole_process": round(peak_mb),
        "bundle_mb": round(size_mb, 1),
        "parity": p.summary(),
        "greedy_agree": f"{p.greedy_agree}/{p.greedy_steps}",
        "parity_seconds": p.seconds,
    }, indent=2))


if __name__ == "__main__":
    main()
