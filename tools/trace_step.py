"""Which project files one decode step passes through: runs a tiny synthetic checkpoint on the default
backend, prefills a batch of prompts, then records every Python function executed (and every compiled
callable invoked, e.g. a Numba kernel) during ONE decode `engine.step()`, on every thread, and prints
the project files they belong to (hybrid/, cpu_kernels/, gpu_kernels/), in first-seen order.

    python tools/trace_step.py [--batch 3] [--json]

Works on any version of the tree that has LLM(...).engine.add_request / step (the closing note of the
layout issue compares the tree before and after with it).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("hybrid", "cpu_kernels", "gpu_kernels")


def project_file(filename: str | None) -> str | None:
    if not filename:
        return None
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return str(rel) if rel.parts and rel.parts[0] in PROJECT else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import hybrid
    from hybrid import LLM, SamplingParams
    try:
        from hybrid.synthetic import write_checkpoint
    except ImportError:
        from hybrid.synthetic import write_checkpoint   # noqa: F811  (older trees: a module, same name)
    seen: dict[str, None] = {}
    recording = {"on": False}

    def prof(frame, event, arg):
        if not recording["on"]:
            return
        if event == "call":
            f = project_file(frame.f_code.co_filename)
        elif event == "c_call":
            mod = getattr(arg, "__module__", None) or ""
            f = None
            if mod.split(".")[0] in PROJECT and mod in sys.modules:
                f = project_file(getattr(sys.modules[mod], "__file__", None))
        else:
            return
        if f:
            seen.setdefault(f, None)

    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, "tiny")
        threading.setprofile(prof)
        sys.setprofile(prof)
        llm = LLM(d, progress=False)
        engine = llm.engine
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        for i in range(args.batch):
            engine.add_request([5 + i, 77, 300, 1200, 9, 42][: 3 + i], sp)
        engine.step()                                  # prefill (and the first token)
        recording["on"] = True
        engine.step()                                  # one decode step of the whole batch
        recording["on"] = False
        sys.setprofile(None)
        threading.setprofile(None)
    files = list(seen)
    if args.json:
        print(json.dumps({"hybrid": str(Path(hybrid.__file__).parent), "files": files, "count": len(files)}))
    else:
        print(f"one decode step (batch {args.batch}, backend {getattr(llm, 'expert_backend', 'auto')}) "
              f"passes through {len(files)} project files:")
        for f in files:
            print("  " + f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
