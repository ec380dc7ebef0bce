"""Interactive terminal chat: `hybrid chat MODEL_DIR`.

Streams each answer as it is generated, the thinking dimmed and apart from the answer; after each
answer prints tokens/s and the turn's prefill count (a later turn reuses the KV cache of the
conversation so far, so it prefills only what is new). The context never runs out: when the
conversation would not fit, the oldest turns are dropped (the system prompt and the last turns kept,
one line says so) and the kept part is reused from the KV cache where the template allows.
Input: Enter sends; Alt-Enter (or Esc then Enter) adds a line; a paste of several lines is one
message (bracketed paste); a line `\"\"\"` opens a block that the next `\"\"\"` closes. Up/Down recall
earlier messages, kept across sessions in $XDG_STATE_HOME/hybrid/chat_history (default
~/.local/state/hybrid). Ctrl-L clears the screen and keeps the prompt; Ctrl-C stops the current answer
and keeps the chat; Ctrl-D leaves. Commands: see HELP. Reads stdin line by line when it is not a
terminal, so tests and scripts pipe commands in.
Checked by tests/test_terminal_chat.py (a pseudo-terminal) and tests/test_cli.py (a pipe).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from hybrid.chat import ChatResult
from hybrid.sampling import SamplingParams

HELP = ("commands: /think on|off  /reset  /system TEXT  /set NAME VALUE  /save FILE  /load FILE  /image PATH  "
        "/help  /exit\n  Enter sends, Alt-Enter adds a line, \"\"\" opens and closes a block; Ctrl-C stops an "
        "answer, Ctrl-L clears the screen")
# /set and the command line: name -> type (SamplingParams checks the values)
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int, "max_tokens": int,
            "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float}
BLOCK = '"""'
KEEP_FREE = 4          # when turns must go, drop until a quarter of the context is free again (fewer drops, more reuse)


def state_dir() -> Path:
    """Where the chat keeps its input history: $XDG_STATE_HOME/hybrid, else ~/.local/state/hybrid."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "hybrid"


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


def kernels_need_compiling(llm) -> bool:
    """True when the numba expert kernels have no usable compiled copy on disk yet (the first answer
    then waits for the compile)."""
    if getattr(llm, "expert_backend", None) != "numba":
        return False
    try:
        from numba.core.dispatcher import Dispatcher

        import cpu_kernels.moe_int4 as kernels
        for f in vars(kernels).values():
            if isinstance(f, Dispatcher) and f.targetoptions.get("inline") != "always" and not f.signatures:
                if not f._cache._cache_file._load_index():          # absent or stale (source changed)
                    return True
    except Exception:              # numba internals moved: say nothing rather than fail
        return False
    return False


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


def fit_context(llm, system: str | None, history: list[dict], first: int, new: dict, thinking: bool,
                reserve: int) -> tuple[int, int]:
    """(index of the first kept message of `history`, prompt tokens) so that the system prompt, the kept
    turns and `new` leave `reserve` tokens for the answer. Drops whole turns (a user message and what
    followed it), oldest first; once some must go, drops until 1/KEEP_FREE of the context is free, so
    the next turns reuse the kept part from the KV cache instead of dropping again. Raises
    ValueError if `new` alone does not fit."""
    limit = llm.engine.max_context
    head = [{"role": "system", "content": system}] if system else []

    def size(start):
        msgs = head + history[start:] + [new]
        if getattr(llm, "images", None) is not None:   # image placeholders count as their expanded tokens
            return len(llm.chat_inputs(msgs, thinking=thinking)[0])
        return len(llm.chat_prompt_ids(msgs, thinking=thinking))
    n = size(first)
    if n + reserve <= limit:
        return first, n
    target = min(limit - reserve, limit - limit // KEEP_FREE)
    starts = [i for i in range(first + 1, len(history)) if history[i]["role"] == "user"] + [len(history)]
    for start in starts:
        first, n = start, size(start)
        if n <= target:
            break
    if n >= limit:
        raise ValueError(f"this message needs {n} prompt tokens (with the system prompt); the context holds "
                         f"{limit} (--max-context)")
    return first, n


def _read_lines(console: Console, prompt: str):
    """User messages: prompt_toolkit on a terminal (history file, Alt-Enter, bracketed paste, Ctrl-L),
    input() with readline without it, plain lines from a pipe. Ends at EOF."""
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    read = None
    if tty:
        try:
            read = _prompt_toolkit_reader()
        except ImportError:
            read = _readline_reader()
    while True:
        try:
            if read is not None:
                line = read(prompt)
            else:
                line = sys.stdin.readline()
                if not line:
                    return
                line = line.rstrip("\n")
                console.print(prompt + line, markup=False, highlight=False)
        except EOFError:
            return
        except KeyboardInterrupt:             # Ctrl-C at the prompt: a fresh prompt, like a shell
            console.print()
            continue
        yield line


def _history_file() -> Path | None:
    try:
        state_dir().mkdir(parents=True, exist_ok=True)
        return state_dir() / "chat_history"
    except OSError:
        return None


def _prompt_toolkit_reader():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    keys = KeyBindings()

    @keys.add("escape", "enter")                  # Alt-Enter (sent as Esc, Enter): a new line in the message
    def _(event):
        event.current_buffer.insert_text("\n")
    path = _history_file()
    session = PromptSession(history=FileHistory(str(path)) if path else InMemoryHistory(), key_bindings=keys,
                            enable_open_in_editor=False)
    return lambda prompt: session.prompt(prompt, multiline=False)


def _readline_reader():
    try:
        import atexit
        import readline
        path = _history_file()
        if path is not None:
            path = path.with_name("chat_history_readline")
            try:
                readline.read_history_file(path)
            except OSError:
                pass
            atexit.register(lambda: readline.write_history_file(path))
    except ImportError:
        pass
    return input                                  # the prompt goes to input(): Ctrl-L redraws it


def _messages(lines, console: Console):
    """Join a `\"\"\"` ... `\"\"\"` block into one message; other lines are messages as they are."""
    lines = iter(lines)
    for line in lines:
        if line.strip().startswith(BLOCK):
            parts = [line.strip()[len(BLOCK):]]
            while not parts[-1].rstrip().endswith(BLOCK):
                nxt = next(lines, None)
                if nxt is None:
                    break
                parts.append(nxt)
            if parts[-1].rstrip().endswith(BLOCK):
                parts[-1] = parts[-1].rstrip()[:-len(BLOCK)]
            yield "\n".join(parts).strip("\n"), True
        else:
            yield line, False


def load_conversation(path: str) -> tuple[str | None, list[dict]]:
    """(system prompt, messages) from a /save file (or any {"messages": [...]} / list of messages)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    msgs = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and m.get("role") in
                                             ("system", "user", "assistant", "tool") for m in msgs):
        raise ValueError(f"{path}: not a saved conversation (expected {{\"messages\": [{{role, content}}, ...]}})")
    system = None
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0].get("content"), msgs[1:]
    return system, msgs


def set_option(sampling: SamplingParams, name: str, value: str) -> SamplingParams:
    """/set NAME VALUE: a new SamplingParams (ValueError names the problem)."""
    name = name.replace("-", "_")
    if name not in SETTABLE:
        raise ValueError(f"unknown setting {name!r}; one of {', '.join(SETTABLE)}")
    if value.lower() in ("none", "default", "off") and name in ("max_tokens", "seed"):
        v = None
    else:
        try:
            v = SETTABLE[name](value)
        except ValueError:
            raise ValueError(f"{name} takes {'an integer' if SETTABLE[name] is int else 'a number'}, "
                             f"got {value!r}") from None
    return dataclasses.replace(sampling, **{name: v})


def run_chat(llm, thinking: bool = True, system: str | None = None, sampling: SamplingParams | None = None,
             console: Console | None = None) -> list[dict]:
    """The chat loop; returns the conversation when the user leaves."""
    console = console or Console(highlight=False, soft_wrap=True)
    sampling = sampling or SamplingParams(max_tokens=None)
    history: list[dict] = []          # the whole conversation (for /save), the model sees history[first:]
    first, images, compiled = 0, [], False
    console.print(f"hybrid chat: {llm.model_dir}  (thinking {'on' if thinking else 'off'}, context "
                  f"{llm.engine.max_context} tokens)", style="bold")
    console.print(HELP, style="dim")
    for text, block in _messages(_read_lines(console, ">>> "), console):
        if not block:
            text = text.strip()
        if not text.strip():
            continue
        if text.startswith("/") and not block:
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
                history, first, images = [], 0, []
                console.print("conversation cleared" + (" (system prompt kept)" if system else ""))
            elif cmd == "/system":
                system = arg or None
                console.print(f"system prompt {'set' if system else 'cleared'}")
            elif cmd == "/set":
                name, _, value = arg.partition(" ")
                if not value.strip():
                    shown = {k: getattr(sampling, k) for k in SETTABLE}
                    console.print("usage: /set NAME VALUE; now " + ", ".join(f"{k}={v}" for k, v in shown.items()),
                                  markup=False)
                    continue
                try:
                    sampling = set_option(sampling, name, value.strip())
                    console.print(f"{name} = {getattr(sampling, name.replace('-', '_'))}", markup=False)
                except ValueError as e:
                    console.print(f"error: {e}", style="red", markup=False)
            elif cmd == "/save":
                if not arg:
                    console.print("usage: /save FILE")
                    continue
                conv = ([{"role": "system", "content": system}] if system else []) + history
                try:
                    Path(arg).expanduser().write_text(json.dumps({"model": str(llm.model_dir), "messages": conv},
                                                                 ensure_ascii=False, indent=2), encoding="utf-8")
                    console.print(f"saved {len(conv)} messages to {arg}", markup=False)
                except OSError as e:
                    console.print(f"could not save: {e}", style="red", markup=False)
            elif cmd == "/load":
                try:
                    loaded_system, loaded = load_conversation(str(Path(arg).expanduser()))
                except (OSError, ValueError) as e:
                    console.print(f"could not load: {e}" if arg else "usage: /load FILE", style="red", markup=False)
                    continue
                system = loaded_system if loaded_system is not None else system
                history, first = loaded, 0
                last = next((m for m in reversed(history) if m["role"] == "user"), None)
                console.print(f"loaded {len(history)} messages from {arg}"
                              + (f"; last question: {str(last.get('content'))[:60]!r}" if last else ""), markup=False)
            elif cmd == "/image":
                if getattr(llm, "images", None) is None or not hasattr(llm, "chat_inputs"):
                    console.print("images: not supported by this checkpoint (no vision tower)", style="yellow")
                elif not Path(arg).expanduser().is_file():
                    console.print(f"no such file: {arg}", style="red", markup=False)
                else:
                    images.append({"type": "image", "image": str(Path(arg).expanduser().resolve())})
                    console.print(f"image attached to the next message ({len(images)})")
            else:
                console.print(HELP, markup=False)
            continue
        new = {"role": "user", "content": [*images, {"type": "text", "text": text}] if images else text}
        reserve = min(sampling.max_tokens or llm.engine.max_context // 4, llm.engine.max_context // 2)
        try:
            kept, _ = fit_context(llm, system, history, first, new, thinking, reserve)
        except ValueError as e:               # includes hybrid.media.MediaError: the image is dropped
            console.print(f"error: {e}", style="red", markup=False)
            images = []
            continue
        except KeyboardInterrupt:             # Ctrl-C before the answer started: nothing was sent
            console.print("[stopped]", style="yellow", markup=False)
            continue
        if kept > first:
            dropped = sum(1 for m in history[first:kept] if m["role"] == "user")
            left = sum(1 for m in history[kept:] if m["role"] == "user")
            console.print(f"[context full: dropped the oldest {dropped} turn{'s' * (dropped != 1)}; kept "
                          f"{'the system prompt and ' if system else ''}the last {left} turn{'s' * (left != 1)}]",
                          style="yellow", markup=False)
            first = kept
        messages = ([{"role": "system", "content": system}] if system else []) + history[first:] + [new]
        if not compiled:
            compiled = True
            if kernels_need_compiling(llm):
                console.print("[compiling the CPU expert kernels once (numba); the first answer waits for it]",
                              style="dim", markup=False)
        try:
            result, _ = stream_turn(llm, console, messages, sampling, thinking)
        except ValueError as e:               # e.g. a template error on a loaded conversation
            console.print(f"error: {e}  (/reset starts over)", style="red", markup=False)
            continue
        except KeyboardInterrupt:             # before stream_turn took over Ctrl-C
            console.print("[stopped]", style="yellow", markup=False)
            continue
        if result is not None:
            history += [new, result.message.to_dict()]
            images = []
    console.print("bye", style="dim")
    return history
