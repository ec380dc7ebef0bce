"""The `hybrid` command: `python -m hybrid --help`, `hybrid demo` end to end in a temporary cache, and
`hybrid chat` driven through a pipe (commands, KV reuse shown per turn, /save, Ctrl-C keeps the chat).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hybrid.synthetic import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **extra}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", "tiny")


def test_python_m_hybrid_help():
    r = subprocess.run([sys.executable, "-m", "hybrid", "--help"], env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for cmd in ("demo", "chat", "serve", "batch", "plan", "bench"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "hybrid", "serve", "--help"], env=_env(), capture_output=True,
                       text=True, timeout=60)
    assert "127.0.0.1" in r.stdout and "--api-key" in r.stdout and "--expert-backend" in r.stdout


def test_demo_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hybrid", "demo", "--expert-backend", "torch", "--max-tokens", "8"],
                       env=_env(HYBRID_CACHE=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert (tmp_path / "tiny-k2.6" / "config.json").is_file()
    assert "routed experts" in out and "tok/s" in out and "hybrid serve" in out and "hybrid batch" in out
    reused = [int(n) for n in re.findall(r"\((\d+) reused from the KV cache\)", out)]
    assert len(reused) == 2 and reused[0] == 0 and reused[1] > 0     # turn 2 prefills only what is new


def test_terminal_chat_through_a_pipe(model_dir, tmp_path):
    saved = tmp_path / "conv.json"
    script = f"/think off\nhello there\nand a second question\n/save {saved}\n/reset\n/think\n/exit\n"
    r = subprocess.run([sys.executable, "-m", "hybrid", "chat", str(model_dir), "--expert-backend", "torch",
                        "--max-tokens", "6"], input=script, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "thinking off" in out and "conversation cleared" in out and "thinking is off" in out
    assert "bye" in out and "thinking: " not in out                  # no reasoning shown with thinking off
    stats = re.findall(r"\[(\d+) tokens, [\d.]+ tok/s; prefill (\d+) of (\d+) prompt tokens \((\d+) reused", out)
    assert len(stats) == 2
    (_, p1, n1, c1), (_, p2, n2, c2) = [tuple(map(int, s)) for s in stats]
    assert c1 == 0 and p1 == n1
    assert c2 >= n1 and p2 == n2 - c2                                 # turn 2 reuses all of turn 1's prompt
    conv = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]


def test_ctrl_c_stops_the_answer_and_keeps_the_chat(model_dir):
    p = subprocess.Popen([sys.executable, "-m", "hybrid", "chat", str(model_dir), "--expert-backend", "torch",
                          "--max-context", "2048", "--ignore-eos"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=_env())
    out = bytearray()
    reader = threading.Thread(target=lambda: [out.extend(c) for c in iter(lambda: p.stdout.read1(4096), b"")],
                              daemon=True)
    reader.start()
    try:
        p.stdin.write(b"/think off\ntell me a long story\n")
        p.stdin.flush()
        deadline = time.time() + 60
        while b">>> tell me a long story" not in out:
            assert time.time() < deadline and p.poll() is None, out.decode(errors="replace")
            time.sleep(0.05)
        time.sleep(0.5)                                  # mid-answer (the answer runs to the 2048-token context)
        p.send_signal(signal.SIGINT)
        deadline = time.time() + 30
        while b"[stopped]" not in out:
            assert time.time() < deadline and p.poll() is None, out.decode(errors="replace")
            time.sleep(0.05)
        p.stdin.write(b"/exit\n")
        p.stdin.flush()
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(timeout=5)
    assert b"bye" in out
