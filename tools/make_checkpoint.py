"""Write a synthetic checkpoint in the real Kimi-K2.6 layout (see hybrid/synthetic/checkpoint.py).

  python tools/make_checkpoint.py OUT_DIR [--preset tiny|k2-slice] [--layout k2.6|k2-thinking|deepseek-v3|bf16]
         [--seed N] [--experts N] [--layers N] [--vocab N] [--set key=value ...]

The k2.6 layout (the default) includes a MoonViT vision tower and projector under K2.6's tensor names: small in
the tiny preset (2 layers x 64), K2.6's real sizes in k2-slice; set them with e.g. --set vt_num_hidden_layers=27
--set vt_hidden_size=1152 --set vt_num_attention_heads=16 --set vt_intermediate_size=4304
--set init_pos_emb_height=64 --set init_pos_emb_width=64 (tools/bench_vision.py does).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid.synthetic import LAYOUTS, PRESETS, write_checkpoint  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--layout", default="k2.6", choices=list(LAYOUTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", type=int, help="routed experts per MoE layer (n_routed_experts)")
    ap.add_argument("--layers", type=int, help="num_hidden_layers")
    ap.add_argument("--vocab", type=int, help="vocab_size (ordinary tokens + 256 special)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override any size: {', '.join(PRESETS['tiny'])}")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = float(value) if "." in value else int(value)
    for key, value in (("n_routed_experts", args.experts), ("num_hidden_layers", args.layers),
                       ("vocab_size", args.vocab)):
        if value is not None:
            overrides[key] = value
    t0 = time.perf_counter()
    out = write_checkpoint(args.out_dir, args.preset, args.layout, seed=args.seed, progress=True, **overrides)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
