"""`hybrid chat` driven through a pseudo-terminal (pexpect), as a person types into it, on the tiny
checkpoint with the default expert backend: 30 turns at --max-context 512 without an error (the oldest
turns are dropped with a one-line notice), a 5-line bracketed paste sent as one message, Alt-Enter and
a \"\"\" block for several lines, Ctrl-L keeps the prompt, Ctrl-C mid-answer stops it and keeps the chat,
/set, /save then /load restoring the conversation, and the input history recalled (Up arrow) after a
restart from $XDG_STATE_HOME/hybrid. Nothing here compares generated text (the weights are random).
Also the pure helpers of hybrid/apps/terminal_chat.py (the \"\"\" block joiner, /set, /load's checks).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from hybrid.apps.terminal_chat import _messages, load_conversation, set_option, state_dir
from hybrid.sampling import SamplingParams
from hybrid.synthetic import write_checkpoint

pexpect = pytest.importorskip("pexpect", reason="pexpect not installed (pip install pexpect)")
pytest.importorskip("prompt_toolkit", reason="prompt_toolkit not installed (pip install prompt_toolkit)")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ">>>"                    # prompt_toolkit draws ">>>" then moves the cursor past the space
STATS = r"\[\d+ tokens, [\d.]+ tok/s"
LOAD_S = 300                      # start + first answer (numba compile) on a slow, shared machine
TURN_S = 120
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tchat") / "tiny", "tiny")


def _spawn(model_dir, state, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_STATE_HOME": str(state), "PROMPT_TOOLKIT_NO_CPR": "1",
           "NO_COLOR": "1", "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "hybrid", "chat", str(model_dir), "--no-think", *args], env=env,
                          dimensions=(50, 200), encoding="utf-8", codec_errors="replace", timeout=TURN_S)
    child.expect(PROMPT, timeout=LOAD_S)
    return child


def _turn(child, keys: str) -> str:
    """Send keys ending a message; return what the turn printed up to the next prompt, without escapes."""
    child.send(keys)
    child.expect(STATS, timeout=LOAD_S)
    shown = child.before + child.after
    child.expect(PROMPT)
    return ANSI.sub("", shown + child.before)


def _command(child, line: str, answer: str) -> str:
    child.send(line + "\r")
    child.expect(answer)
    out = ANSI.sub("", child.before + child.after)      # (read before the next expect replaces them)
    child.expect(PROMPT)
    return out


def _quit(child):
    child.send("/exit\r")
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_thirty_turns_in_a_512_token_context(model_dir, tmp_path):
    child = _spawn(model_dir, tmp_path / "state", "--max-context", "512", "--max-tokens", "16")
    dropped = 0
    for i in range(30):
        out = _turn(child, f"turn {i}: please tell me something about the number {i} and the colour of the sky\r")
        assert "error" not in out.lower(), out
        drop = "[context full: dropped the oldest" in out
        dropped += drop
        reused = int(re.search(r"\((\d+) reused from the KV cache\)", out).group(1))
        if i and not drop:
            assert reused > 0, out          # the kept conversation comes from the KV cache, not a new prefill
    assert dropped >= 2, "30 turns of ~60 tokens overflow 512 tokens more than once"
    _quit(child)


def test_paste_block_ctrl_c_save_load_and_history(model_dir, tmp_path):
    state, saved = tmp_path / "state", tmp_path / "conv.json"
    child = _spawn(model_dir, state, "--max-context", "2048", "--max-tokens", "8", "--ignore-eos")
    child.send("\x0c")                                        # Ctrl-L: clear the screen, prompt redrawn
    child.expect(r"\x1b\[2J")
    child.expect(PROMPT)
    paste = "first line\nsecond line\nthird line\nfourth line\nfifth line"
    out = _turn(child, "\x1b[200~" + paste + "\x1b[201~\r")     # a bracketed paste, then Enter
    assert len(re.findall(STATS, out)) == 1
    _turn(child, "alpha\x1b\rbeta\r")                          # Alt-Enter adds a line
    for line in ('"""', "block one", "block two"):
        child.send(line + "\r")
        child.expect(PROMPT)
    _turn(child, '"""\r')
    assert "max_tokens = None" in _command(child, "/set max_tokens none", r"max_tokens = None")
    child.send("tell me a very long story\r")
    child.expect("tell me a very long story")                # the line is taken (echoed) ...
    time.sleep(0.3)                                          # ... and the answer is under way: it would run to
    child.sendintr()                                         # the context's end, ~2 s on a quiet machine
    child.expect(r"\[stopped\]", timeout=LOAD_S)
    child.expect(PROMPT)
    assert "temperature = 0.5" in _command(child, "/set temperature 0.5", r"temperature = 0.5")
    assert "error" in _command(child, "/set temperature hot", r"error: [^\r\n]+")
    _command(child, "/set max_tokens 8", "max_tokens = 8")
    _turn(child, "remember the word pineapple\r")
    assert "saved 10 messages" in _command(child, f"/save {saved}", r"saved \d+ messages")
    _quit(child)
    conv = json.loads(saved.read_text())["messages"]
    users = [m["content"] for m in conv if m["role"] == "user"]
    assert users == [paste, "alpha\nbeta", "block one\nblock two", "tell me a very long story",
                     "remember the word pineapple"]
    assert [m["role"] for m in conv] == ["user", "assistant"] * 5

    history = state / "hybrid" / "chat_history"
    assert history.is_file() and "pineapple" in history.read_text()
    child = _spawn(model_dir, state, "--max-context", "2048", "--max-tokens", "8")
    _turn(child, "\x1b[A" * 3 + "\r")                   # Up x3: /exit, /save, then the last message
    recalled = tmp_path / "recalled.json"
    _command(child, f"/save {recalled}", r"saved \d+ messages")
    assert [m["content"] for m in json.loads(recalled.read_text())["messages"]][0] == "remember the word pineapple"
    assert "loaded 10 messages" in _command(child, f"/load {saved}", r"loaded \d+ messages[^\r\n]*")
    again = tmp_path / "again.json"
    _command(child, f"/save {again}", r"saved \d+ messages")
    assert json.loads(again.read_text())["messages"] == conv         # /load restored the whole conversation
    out = _turn(child, "and one more question\r")                    # the loaded conversation goes on
    assert "error" not in out.lower(), out
    _quit(child)


def test_helpers(tmp_path, monkeypatch):
    lines = ["hello", '"""', "one", "two", '"""', '"""inline"""', "/exit"]
    assert list(_messages(lines, None)) == [("hello", False), ("one\ntwo", True), ("inline", True), ("/exit", False)]
    p = set_option(SamplingParams(), "top-k", "20")
    assert p.top_k == 20 and set_option(p, "seed", "none").seed is None
    for name, value in (("top_k", "x"), ("nope", "1"), ("temperature", "-1")):
        with pytest.raises(ValueError):
            set_option(p, name, value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "wizard"}]}')
    with pytest.raises(ValueError, match="not a saved conversation"):
        load_conversation(str(bad))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"}]}))
    assert load_conversation(str(good)) == ("be brief", [{"role": "user", "content": "hi"}])
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert state_dir() == tmp_path / "hybrid"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert state_dir() == Path.home() / ".local" / "state" / "hybrid"


def test_compile_notice_only_without_compiled_kernels(tmp_path):
    """kernels_need_compiling is True when numba has no compiled copy of the expert kernels (an empty
    NUMBA_CACHE_DIR), False for a backend that is not numba."""
    import subprocess
    code = ("from types import SimpleNamespace as S; from hybrid.apps.terminal_chat import kernels_need_compiling as k; "
            "print(k(S(expert_backend='numba')), k(S(expert_backend='torch')))")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT),
                       "NUMBA_CACHE_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["True", "False"], r
