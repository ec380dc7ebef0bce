"""Interactive terminal chat: `hybrid chat MODEL_DIR`.

Streams each answer as it is generated, the thinking dimmed and apart from the answer; after each
answer prints tokens/s and the turn's prefill count (a later turn reuses the KV cache of the
conversation so far, so it prefills only what is new). Commands: /think on|off, /reset,
/system TEXT, /save FILE, /help, /exit. Ctrl-C stops the current answer and keeps the chat.
Reads stdin line by line when it is not a terminal, so tests pipe commands in.
Checked by tests/test_cli.py::test_terminal_chat_through_a_pipe.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import contextmanager

from rich.console import Console

from hybrid.chat import ChatResult
from hybrid.sampling import SamplingParams

HELP = ("commands: /think on|off  /reset  /system TEXT  /save FILE  /help  /exit   "
        "(Ctrl-C stops an answer)")


@contextmanager
def interruptible():
    """Turn Ctrl-C into a flag checked between engine steps, so an answer stops at a step boundary
    (a KeyboardInterrupt inside a forward would leave the KV cache half written)."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["stop"] = True
    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def stream_turn(llm, console: Console, messages: list[dict], sampling: SamplingParams, thinking: bool,
                tools=None) -> tuple[ChatResult | None, bool]:
    """Stream one assistant turn to the console; returns (result, stopped by Ctrl-C).
    The result is None only when Ctrl-C came before anything was generated."""
    from hybrid.text.output_parser import accumulate
    section, deltas, result, stopped = None, [], None, False
    t0 = time.perf_counter()
    with interruptible() as flag:
        gen = llm.chat_stream(messages, sampling, tools=tools, thinking=thinking)
        try:
            for item in gen:
                if isinstance(item, ChatResult):
                    result = item
                    break
                deltas.append(item)
                kind = "thinking" if item.type == "reasoning" else "answer"
                if kind != section:
                    if section is not None:
                        console.print()
                    if kind == "thinking":
                        console.print("thinking: ", style="dim italic", end="")
                    section = kind
                if item.type == "tool_call":
                    text = f"[tool call {item.name}] " if item.name else (item.arguments or "")
                else:
                    text = item.text
                console.print(text, style="dim" if kind == "thinking" else None, end="",
                              markup=False, highlight=False, soft_wrap=True)
                if flag["stop"]:
                    stopped = True
                    break
        finally:
            gen.close()                        # aborts the request in the engine if it is still running
    console.print()
    if result is None and deltas:             # stopped: keep what was shown as the turn
        result = ChatResult(accumulate(deltas, thinking), "abort")
    if stopped:
        console.print("[stopped]", style="yellow", markup=False)
    if result is not None and result.metrics:
        m = result.metrics
        console.print(f"[{m['completion_tokens']} tokens, {m['decode_tokens_per_s']:.1f} tok/s; "
                      f"prefill {m['prefill_tokens']} of {m['prompt_tokens']} prompt tokens "
                      f"({m['cached_prompt_tokens']} reused from the KV cache); "
                      f"first token after {m['time_to_first_token_s']:.2f} s]",
                      style="dim", markup=False, highlight=False)
    elif result is not None:
        console.print(f"[{time.perf_counter() - t0:.1f} s]", style="dim", markup=False)
    return result, stopped


def _lines(console: Console, prompt: str):
    """User input: rich's prompt on a terminal, plain lines from a pipe. Ends at EOF."""
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            line = console.input(prompt) if tty else sys.stdin.readline()
        except EOFError:
            return
        except KeyboardInterrupt:             # Ctrl-C at the prompt: a fresh prompt, like a shell
            console.print()
            continue
        if not tty:
            if not line:
                return
            console.print(prompt + line.rstrip("\n"), markup=False, highlight=False)
        yield line.rstrip("\n")


def run_chat(llm, thinking: bool = True, system: str | None = None, sampling: SamplingParams | None = None,
             console: Console | None = None) -> list[dict]:
    """The chat loop; returns the conversation when the user leaves."""
    console = console or Console(highlight=False, soft_wrap=True)
    sampling = sampling or SamplingParams(max_tokens=None)
    history: list[dict] = []
    console.print(f"hybrid chat: {llm.model_dir}  (thinking {'on' if thinking else 'off'})", style="bold")
    console.print(HELP, style="dim")
    for line in _lines(console, ">>> "):
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/exit", "/quit", "/bye"):
                break
            if cmd == "/think":
                if arg not in ("on", "off"):
                    console.print(f"thinking is {'on' if thinking else 'off'}; use /think on or /think off")
                else:
                    thinking = arg == "on"
                    console.print(f"thinking {arg}")
            elif cmd == "/reset":
                history = []
                console.print("conversation cleared" + (" (system prompt kept)" if system else ""))
            elif cmd == "/system":
                system = arg or None
                console.print(f"system prompt {'set' if system else 'cleared'}")
            elif cmd == "/save":
                if not arg:
                    console.print("usage: /save FILE")
                    continue
                conv = ([{"role": "system", "content": system}] if system else []) + history
                try:
                    with open(arg, "w", encoding="utf-8") as f:
                        json.dump({"model": str(llm.model_dir), "messages": conv}, f, ensure_ascii=False, indent=2)
                    console.print(f"saved {len(conv)} messages to {arg}")
                except OSError as e:
                    console.print(f"could not save: {e}", style="red")
            else:
                console.print(HELP)
            continue
        turn = history + [{"role": "user", "content": text}]
        messages = ([{"role": "system", "content": system}] if system else []) + turn
        try:
            result, _ = stream_turn(llm, console, messages, sampling, thinking)
        except ValueError as e:               # e.g. the conversation no longer fits the context
            console.print(f"error: {e}  (/reset starts over)", style="red", markup=False)
            continue
        if result is not None:
            history = turn + [result.message.to_dict()]
    console.print("bye", style="dim")
    return history
