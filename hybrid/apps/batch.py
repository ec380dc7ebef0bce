"""Offline batch jobs: a JSONL file of requests -> a JSONL file of results, resumable.

    hybrid batch MODEL_DIR --input in.jsonl --output out.jsonl

Each input line is {"id": ..., "messages": [...] | "prompt": "..." | [ids], sampling fields as in the
server (max_tokens, temperature, top_p, top_k, min_p, penalties, seed, stop, ...), optional tools /
tool_choice and chat_template_kwargs {thinking, preserve_thinking}}. Requests go through the engine
together (many added, then stepped until done), and each result is appended and flushed the moment it
finishes, in finishing order. Re-running the same command skips every input already answered in the
output and does the rest, so each input line gets exactly one record: a result, or an error record
{"id", "line", "error", "param"} for a malformed line, a bad field, a duplicate id or a prompt longer
than the context. A record cut short by a crash (no final newline) is dropped and redone.
Checked by tests/test_batch.py (resume after the process is killed mid-job, malformed lines, duplicates).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import hybrid.apps.openai_protocol as protocol
from hybrid.chat import chat_sampling
from hybrid.text.output_parser import parse_output
from hybrid.apps.openai_protocol import FieldError



@dataclass
class _Entry:
    line: int
    key: str                  # what marks this input as answered in the output
    id: object = None
    request: dict | None = None
    error: str | None = None
    param: str | None = None


def _key(record_or_id, line: int | None = None, duplicate: bool = False) -> str:
    """Inputs with a usable id are keyed by it; a duplicate or an id-less line by its line number."""
    if duplicate:
        return f"dup-line:{line}"
    if record_or_id is None:
        return f"line:{line}"
    return "id:" + json.dumps(record_or_id, sort_keys=True)


def answered(output: Path) -> set[str]:
    """Keys of the inputs the output already answers; drops a torn last record (no newline)."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(output, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    keys = set()
    for raw in data.splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and "line" in rec:
            keys.add(_key(rec.get("id"), rec["line"], "duplicate_of_line" in rec))
    return keys


def read_entries(input_path: Path) -> list[_Entry]:
    """Every non-blank input line, parsed; malformed lines and duplicate ids become error entries."""
    entries, first_line = [], {}
    with open(input_path, encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:
                entries.append(_Entry(n, _key(None, n), error=f"line {n} is not valid JSON: {e}"))
                continue
            if not isinstance(obj, dict):
                entries.append(_Entry(n, _key(None, n), error=f"line {n} must be a JSON object"))
                continue
            rid = obj.get("id")
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                entries.append(_Entry(n, _key(None, n), error=f"line {n}: 'id' (a string or an integer) is required",
                                      param="id"))
                continue
            k = _key(rid)
            if k in first_line:
                e = _Entry(n, _key(rid, n, duplicate=True), rid, param="id",
                           error=f"line {n}: duplicate id {rid!r} (first on line {first_line[k]})")
                e.request = {"duplicate_of_line": first_line[k]}
                entries.append(e)
                continue
            first_line[k] = n
            has_m, has_p = obj.get("messages") is not None, obj.get("prompt") is not None
            if has_m == has_p:
                entries.append(_Entry(n, k, rid, error=f"line {n}: give exactly one of 'messages' and 'prompt'",
                                      param="messages"))
                continue
            entries.append(_Entry(n, k, rid, request=obj))
    return entries


class _Writer:
    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def error(self, e: _Entry) -> None:
        rec = {"id": e.id, "line": e.line, "error": e.error, "param": e.param}
        if e.request and "duplicate_of_line" in e.request:
            rec["duplicate_of_line"] = e.request["duplicate_of_line"]
        self.write(rec)


def _prepare(llm, e: _Entry, defaults: dict, max_tokens: int | None):
    """-> (prompt ids, SamplingParams, chat args or None); FieldError for a bad field."""
    req = e.request
    params = protocol.sampling_params(req, defaults, max_tokens=max_tokens)
    if req.get("messages") is not None:
        args = protocol.chat_args(req)
        return protocol.chat_prompt(llm, args), chat_sampling(params), args
    prompts = protocol.completion_prompts(llm, req)
    if len(prompts) != 1:
        raise FieldError("prompt", "one prompt per line (a string or a list of token ids)")
    return prompts[0], params, None


def _result(e: _Entry, args, text: str, token_ids: list[int], last) -> dict:
    rec = {"id": e.id, "line": e.line}
    reason = last.finish_reason
    if args is not None:
        msg = parse_output(text, args.thinking)
        rec["message"] = protocol.message_dict(msg)
        if msg.tool_calls and reason == "stop":
            reason = "tool_calls"
    else:
        rec["text"] = text
    rec["finish_reason"] = reason
    rec["usage"] = protocol.usage(len(last.prompt_token_ids), len(token_ids), last.cached_prompt_tokens)
    m = last.metrics or {}
    rec["metrics"] = {k: round(m[k], 4) for k in ("time_to_first_token_s", "decode_tokens_per_s") if k in m}
    return rec


def run_batch(llm, input_path, output_path, max_tokens: int | None = None, progress: bool = True) -> dict:
    """Answer every input line not yet answered in output_path. Returns counts."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise ValueError(f"--input {input_path}: no such file")
    done = answered(output_path)
    todo = [e for e in read_entries(input_path) if e.key not in done]
    defaults = protocol.generation_defaults(llm.model_dir)
    engine = llm.engine
    window = 2 * engine.max_batch              # requests held in the engine at once
    writer = _Writer(output_path)
    bar = tqdm(total=len(todo), desc="batch", unit="req", disable=not progress, dynamic_ncols=True)
    live: dict[str, tuple] = {}                 # request id -> (entry, chat args, text parts, token ids)
    counts = {"skipped": len(done), "results": 0, "errors": 0}
    t0, n_tokens = time.perf_counter(), 0
    pending = iter(todo)
    try:
        while True:
            while len(live) < window:
                e = next(pending, None)
                if e is None:
                    break
                if e.error is None:
                    try:
                        prompt, params, args = _prepare(llm, e, defaults, max_tokens)
                        rid = engine.add_request(prompt, params)
                        live[rid] = (e, args, [], [])
                        continue
                    except FieldError as err:
                        e.error, e.param = f"line {e.line}: {err.message}", err.param
                    except ValueError as err:          # the engine's: too long, bad ids
                        e.error, e.param = f"line {e.line}: {err}", "messages" if "messages" in e.request else "prompt"
                writer.error(e)
                counts["errors"] += 1
                bar.update(1)
            if not live:
                break
            for d in engine.step():
                if d.request_id not in live:
                    continue
                e, args, parts, ids = live[d.request_id]
                parts.append(d.text)
                ids += d.token_ids
                n_tokens += len(d.token_ids)
                if d.finish_reason is not None:
                    del live[d.request_id]
                    writer.write(_result(e, args, "".join(parts), ids, d))
                    counts["results"] += 1
                    bar.update(1)
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s", refresh=False)
    finally:                                   # Ctrl-C: what finished is on disk; the rest reruns
        try:
            for rid in live:
                engine.abort(rid)
            if live:
                engine.step()          # drops them (no forward runs for aborted requests)
        except Exception:              # after Ctrl-C inside a step the engine may be mid-update
            pass
        bar.close()
        writer.f.close()
    counts["tokens_per_s"] = n_tokens / max(time.perf_counter() - t0, 1e-9)
    return counts
