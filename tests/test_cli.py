"""The `hybrid` command (console script hybrid.apps.cli:main, also `python -m hybrid`): --help, the
dispatch of `hybrid bench` (tools/*.py run by path from the source tree), `hybrid profile`
(hybrid/apps/profile.py) and `hybrid plan`, `hybrid demo` end to end in a temporary cache, and
`hybrid chat` driven through a pipe (commands, KV reuse shown per turn, /save, Ctrl-C keeps the chat).
Demo and chat run the default expert backend (auto), the one a user gets; nothing here compares tokens.
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
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from hybrid.apps.cli import main
from hybrid.synthetic import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("demo", "chat", "serve", "batch", "plan", "profile", "bench")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **extra}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", "tiny")


def test_python_m_hybrid_help():
    r = subprocess.run([sys.executable, "-m", "hybrid", "--help"], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in COMMANDS:
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "hybrid", "serve", "--help"], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert "127.0.0.1" in r.stdout and "--api-key" in r.stdout and "--expert-backend" in r.stdout


def test_console_script_is_apps_cli_main():
    scripts = entry_points(group="console_scripts", name="hybrid")
    assert [e.value for e in scripts] == ["hybrid.apps.cli:main"]
    script = Path(sys.executable).parent / "hybrid"
    if not script.is_file():
        pytest.skip(f"the console script is not installed next to {sys.executable}")
    r = subprocess.run([str(script), "--help"], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: hybrid") and all(cmd in r.stdout for cmd in COMMANDS)
    r = subprocess.run([str(script)], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "hybrid demo" in r.stdout          # no command: the help


def test_bench_profile_plan_dispatch(tmp_path, capsys):
    assert main(["bench"]) == 2 and "hybrid bench {generate,experts}" in capsys.readouterr().err
    assert main(["bench", "nope"]) == 2
    argv = list(sys.argv)
    for name, option in (("generate", "--batches"), ("experts", "--threads")):   # tools/<bench>.py by path
        assert (ROOT / "tools" / f"bench_{name}.py").is_file()
        with pytest.raises(SystemExit) as e:
            main(["bench", name, "--help"])
        assert e.value.code == 0 and option in capsys.readouterr().out
        assert sys.argv == argv                                       # restored after the script ran
    with pytest.raises(SystemExit) as e:                              # hybrid/apps/profile.py's own options
        main(["profile", "--help"])
    assert e.value.code == 0 and "--prompts" in capsys.readouterr().out
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n")
    assert main(["profile", str(tmp_path), "--prompts", str(empty)]) == 2      # refused before any loading
    assert "hybrid profile: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0 and "--gpu-mem" in capsys.readouterr().out


def test_demo_end_to_end_default_backend(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hybrid", "demo", "--max-tokens", "4"],
                       env=_env(HYBRID_CACHE=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert (tmp_path / "tiny-k2.6" / "config.json").is_file()
    # the backends auto picks (TorchExperts would be the fallback); ours names its instruction set
    assert re.search(r"routed experts on the CPU \((NumbaExperts, [a-z0-9]+ kernels|KTExperts)\)", out), out
    assert "tok/s" in out and "hybrid serve" in out and "hybrid batch" in out
    stats = re.findall(r"\[(\d+) tokens, .*?\((\d+) reused from the KV cache\)", out)
    assert [int(n) for n, _ in stats][:2] == [4, 4]                  # two text turns (then the demo's image turn)
    reused = [int(c) for _, c in stats]
    assert reused[0] == 0 and reused[1] > 0                          # turn 2 prefills only what is new


def test_terminal_chat_through_a_pipe(model_dir, tmp_path):
    saved = tmp_path / "conv.json"
    script = f"/think off\nhello there\nand a second question\n/save {saved}\n/reset\n/think\n/exit\n"
    r = subprocess.run([sys.executable, "-m", "hybrid", "chat", str(model_dir), "--max-tokens", "6"], input=script,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"routed experts: (numba|kt) backend", r.stderr), r.stderr     # the default path
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
    p = subprocess.Popen([sys.executable, "-m", "hybrid", "chat", str(model_dir), "--max-context", "2048",
                          "--ignore-eos"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         env=_env())
    out = bytearray()
    reader = threading.Thread(target=lambda: [out.extend(c) for c in iter(lambda: p.stdout.read1(4096), b"")],
                              daemon=True)
    reader.start()
    try:
        p.stdin.write(b"/think off\ntell me a long story\n")
        p.stdin.flush()
        deadline = time.time() + 300                    # loading, on a slow machine
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


# ---- messages and one-line errors -------------------------------------------------------------------
def _run(*argv, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybrid", *argv], env=_env(**extra), capture_output=True,
                          text=True, timeout=300, input="/exit\n")


def test_version_and_one_line_errors(model_dir, tmp_path):
    r = _run("--version")
    assert r.returncode == 0 and re.fullmatch(r"hybrid \d+\.\d+\.\d+.*\n", r.stdout), r.stdout
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((model_dir / "config.json").read_text())
    cases = [(("chat", str(tmp_path / "nope")), "no such directory"),
             (("chat", str(tmp_path)), "no config.json"),
             (("chat", str(no_tok)), "tiktoken.model"),                       # before any loading
             (("chat", str(model_dir), "--max-context", "999999"), "max_position_embeddings"),
             (("chat", str(model_dir), "--temperature", "-1"), "temperature"),
             (("chat", str(model_dir), "--device", "cpu", "--gpu-experts", "8"), "--gpu-experts 8"),
             (("plan", str(model_dir), "--gpu-mem", "24", "--ram", "64GB"), "24GB")]
    for argv, needle in cases:
        r = _run(*argv)
        err = r.stderr.strip()
        assert r.returncode == 2 and needle in err, (argv, r.stderr)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
    r = _run("chat", str(tmp_path / "nope"), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "no such directory" in r.stderr


def test_max_model_len_default_context_and_sampling_flags(model_dir):
    """--max-model-len is --max-context; without either the context is the plan's longest (the tiny model's
    maximum, 4096, fits any machine); the sampling flags are taken."""
    r = _run("chat", str(model_dir), "--max-model-len", "640", "--top-k", "5", "--min-p", "0.1", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "context 640 tokens" in r.stdout
    r = _run("chat", str(model_dir))
    assert r.returncode == 0, r.stderr
    assert "context 4096 tokens" in r.stdout and "context: 4096 tokens per sequence" in r.stderr \
        and "(the model's maximum)" in r.stderr


def test_expert_cache_says_written_then_used(model_dir, tmp_path):
    cache = tmp_path / "cache"
    first = _run("chat", str(model_dir), "--max-context", "256", "--expert-cache", str(cache))
    assert first.returncode == 0, first.stderr
    assert re.search(r"expert cache \S+: wrote (\d+) layers", first.stderr), first.stderr
    second = _run("chat", str(model_dir), "--max-context", "256", "--expert-cache", str(cache))
    assert second.returncode == 0, second.stderr
    assert re.search(r"expert cache \S+: used (\d+) layers \(memory-mapped\)$", second.stderr, re.M), second.stderr


def test_import_hybrid_from_the_parent_of_a_clone_named_hybrid(tmp_path):
    """A clone in a folder named `hybrid`, Python started in its parent: '' (the current folder) comes first
    on sys.path, so `import hybrid` finds the clone as a namespace package unless a regular `hybrid`
    package is on sys.path too: a regular install, or an editable one in compat mode
    (`pip install -e . --config-settings editable_mode=compat`, whose .pth puts the clone on sys.path;
    that is what PYTHONPATH does here). The default editable install (an import hook that runs after
    the path search) loses to the namespace package."""
    (tmp_path / "hybrid").symlink_to(ROOT)
    code = "import hybrid; print(hybrid.__file__, hasattr(hybrid, 'LLM'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.split() == [str(ROOT / "hybrid" / "__init__.py"), "True"], r
