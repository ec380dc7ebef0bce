"""Images/s and time to first token for one image (448x448 and 1024x1024 by default) on this machine, plus the
plan-style estimate of K2.6's tower on a GPU (FLOPs from VisionConfig.flops / a stated TFLOP/s).

  python tools/bench_vision.py [--model DIR] [--sizes 448,1024] [--repeat 2] [--gpu-tflops 989 --mfu 0.4]

Without --model it writes a synthetic k2.6 checkpoint whose vision tower has K2.6's REAL dimensions
(27 layers, hidden 1152, 16 heads, MLP 4304, 64x64 position table) in front of the tiny language model
(so the projector's output width is the tiny model's, not 7168: that part is ~3% of the tower's FLOPs).
images/s = 1 / (decode + preprocess + tower + projector) with the content cache cleared; TTFT = chat_inputs
(the same work) + prefill + first token through LLM.stream. Runs once; a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REAL_TOWER = dict(vt_hidden_size=1152, vt_num_hidden_layers=27, vt_num_attention_heads=16, vt_intermediate_size=4304,
                  init_pos_emb_height=64, init_pos_emb_width=64)


def _png(side: int) -> bytes:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(side)
    img = Image.fromarray(rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)).resize((side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a K2.5/K2.6 checkpoint (default: a synthetic one with the real tower sizes)")
    ap.add_argument("--sizes", default="448,1024", help="square image sides in pixels")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per size (the best is reported)")
    ap.add_argument("--layers", type=int, help="tower layers of the synthetic checkpoint (default 27, as K2.6)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU of the estimate "
                                                                     "(H100/H200 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.4, help="fraction of that peak the tower reaches")
    args = ap.parse_args(argv)

    import torch

    from hybrid import LLM
    from hybrid.config import load_config
    from hybrid.media import navit_resize
    from hybrid.sampling import SamplingParams
    model_dir = args.model
    if model_dir is None:
        from hybrid.synthetic import write_checkpoint
        sizes = dict(REAL_TOWER)
        if args.layers:
            sizes["vt_num_hidden_layers"] = args.layers
        model_dir = Path(tempfile.mkdtemp(prefix="bench-vision-"))
        t0 = time.perf_counter()
        write_checkpoint(model_dir, "tiny", **sizes)
        print(f"wrote a synthetic k2.6 checkpoint with the real tower sizes in {time.perf_counter() - t0:.0f} s: "
              f"{model_dir}")
    llm = LLM(model_dir, device=args.device, progress=False)
    v = llm.config.vision
    real = load_config(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "kimi-k2.6").vision
    print(f"device {llm.device}, dtype {llm.dtype}, torch threads {torch.get_num_threads()}; tower: "
          f"{v.num_hidden_layers} layers x {v.hidden_size}, projector -> {v.text_hidden_size}; vision weights "
          f"{v.weight_count() * 2 / 1e6:.0f} MB bf16 (K2.6: {real.weight_count() * 2 / 1e6:.0f} MB)")
    warm = [{"role": "user", "content": [{"type": "image", "image": _png(56)}, {"type": "text", "text": "hi"}]}]
    prompt, media = llm.chat_inputs(warm)          # warm-up (first-call costs: kernels, allocations), not timed
    next(iter(llm.stream(prompt, SamplingParams(max_tokens=1, temperature=0.0), media=media)))
    print(f"{'image':>10} {'patches':>8} {'tokens':>7} {'preproc s':>10} {'tower s':>8} {'images/s':>9} "
          f"{'TTFT s':>7} {'GFLOP':>7} {'GFLOP/s':>8} | K2.6 on GPU: {'TFLOP':>6} {'est. ms':>8}")
    for side in [int(s) for s in args.sizes.split(",")]:
        data = _png(side)
        msgs = [{"role": "user", "content": [{"type": "image", "image": data}, {"type": "text", "text": "describe"}]}]
        best = None
        for _ in range(max(1, args.repeat)):
            llm.images.clear()
            t0 = time.perf_counter()
            [im] = llm.images.process([("bench", data)])
            t1 = time.perf_counter()
            llm.images.encode([im])
            if llm.device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            llm.images.clear()
            t3 = time.perf_counter()
            prompt, media = llm.chat_inputs(msgs)
            next(iter(llm.stream(prompt, SamplingParams(max_tokens=1, temperature=0.0), media=media)))
            t4 = time.perf_counter()
            run = (t1 - t0, t2 - t1, t4 - t3)
            best = run if best is None or sum(run) < sum(best) else best
        gh, gw = im.grid
        pre, tower, ttft = best
        fl = v.flops(gh, gw)
        _, (ph, pw) = navit_resize(side, side)
        real_fl = real.flops(ph // 14, pw // 14)
        est_ms = real_fl / (args.gpu_tflops * 1e12 * args.mfu) * 1e3
        print(f"{side:>4}x{side:<5} {gh * gw:>8} {im.n_tokens:>7} {pre:>10.3f} {tower:>8.2f} {1 / (pre + tower):>9.3f} "
              f"{ttft:>7.2f} {fl / 1e9:>7.0f} {fl / tower / 1e9:>8.1f} | {'':>11} {real_fl / 1e12:>6.2f} {est_ms:>8.1f}")
    if args.model is None:
        import shutil
        shutil.rmtree(model_dir, ignore_errors=True)
    print(f"GPU estimate: K2.6's tower FLOPs / ({args.gpu_tflops:g} TFLOP/s x {args.mfu:g} MFU); weights "
          f"{real.weight_count() * 2 / 1e9:.2f} GB bf16 = 2 bytes x VisionConfig.weight_count()")


if __name__ == "__main__":
    main()
