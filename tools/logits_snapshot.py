"""Bit-for-bit comparison of two versions of the tree: the logits (score) and greedy tokens (generate, through
the cache and the absorbed decode) of the tiny synthetic checkpoints, per expert backend, saved by one tree
and compared with another. Used for "behaviour unchanged" across a refactor; not a test (a test must not
take our own outputs as expected values).

    python tools/logits_snapshot.py save OUT.pt [--ckpts DIR]      # run in tree A
    python tools/logits_snapshot.py compare A.pt B.pt              # after saving in tree B

The checkpoints are written once into --ckpts (default /tmp/hybrid-snapshot-ckpts) and reused, so both trees
read the same files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

VARIANTS = {"k2.6": dict(), "groups": dict(n_group=4, topk_group=2, seed=1),
            "dense2-yarn": dict(first_k_dense_replace=2, num_hidden_layers=4, beta_fast=1.0, seed=2),
            "deepseek-v3-fp8": dict(layout="deepseek-v3", n_group=4, topk_group=2, seed=3)}
BACKENDS = ("ref", "numba", "torch")


def save(out: str, ckpts: Path) -> None:
    sys.path.insert(0, str(Path.cwd()))          # the tree the command runs in
    from hybrid import LLM, SamplingParams
    from hybrid.synthetic import write_checkpoint
    ids = torch.randint(0, 2048, (47,), generator=torch.Generator().manual_seed(5)).tolist()
    snap = {}
    for name, kw in VARIANTS.items():
        d = ckpts / name
        if not d.exists():
            write_checkpoint(d, "tiny", **kw)
        for be in BACKENDS:
            llm = LLM(d, expert_backend=be, progress=False)
            snap[f"{name}/{be}/score"] = llm.score(ids)
            r = llm.generate([ids[:9]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            snap[f"{name}/{be}/generate"] = torch.tensor(r[0].token_ids)
    torch.save(snap, out)
    print(f"saved {len(snap)} entries to {out}")


def compare(a: str, b: str) -> int:
    A, B = torch.load(a), torch.load(b)
    differ = 0
    for k in sorted(set(A) | set(B)):
        if k not in A or k not in B:
            print(f"{k:40s} only in {'B' if k not in A else 'A'}")
            differ += 1
        elif torch.equal(A[k], B[k]):
            print(f"{k:40s} bit-identical")
        else:
            d = (A[k].float() - B[k].float()).abs().max().item() if A[k].shape == B[k].shape else float("nan")
            print(f"{k:40s} DIFFERENT (max |a - b| {d:.3g})")
            differ += 1
    print(f"{differ} of {len(set(A) | set(B))} entries differ")
    return 1 if differ else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("out")
    s.add_argument("--ckpts", default="/tmp/hybrid-snapshot-ckpts")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args(argv)
    if args.cmd == "save":
        save(args.out, Path(args.ckpts))
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
