"""Logit match against transformers' DeepseekV3ForCausalLM on fresh synthetic checkpoints (the figures
of tests/test_model.py, printed): for each variant and prompts of 1, 23, 64 and 300 tokens, the
per-position error |ours - HF| / max |logit| (worst and median position) and argmax agreement.
With int8 activations (numba) the worst positions are those where a near-tie in a router flips.

    python tools/logit_match.py [--expert-backend torch|ref|numba]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from conftest import VARIANTS  # noqa: E402
from hf_reference import build_hf_model, hf_logits  # noqa: E402
from hybrid import LLM  # noqa: E402
from hybrid.synthetic import write_checkpoint  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expert-backend", default="torch")
    args = ap.parse_args(argv)
    for name, kw in VARIANTS.items():
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(d, "tiny", tokenizer=False, **kw)
            llm, ref = LLM(d, expert_backend=args.expert_backend, progress=False), build_hf_model(d)
            errs, agree = [], []
            for n in (1, 23, 64, 300):
                ids = torch.randint(0, 2048, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                ours, theirs = llm.score(ids), hf_logits(ref, ids)
                errs.append((ours - theirs).abs().amax(-1) / theirs.abs().amax(-1))
                agree.append(ours.argmax(-1) == theirs.argmax(-1))
        err, agree = torch.cat(errs), torch.cat(agree).float()
        print(f"{name:18s} |ours-hf|/max|logit|: worst {err.max():.2e}, median {err.median():.2e}; "
              f"same argmax at {agree.mean():.1%} of {len(agree)} positions")


if __name__ == "__main__":
    main()
