"""Offline batch jobs: a JSONL file of requests -> a JSONL file of results, resumable.

    hybrid batch MODEL_DIR --input in.jsonl --output out.jsonl

Each input line is {"id": ..., "messages": [...] | "prompt": "..." | [ids], sampling fields as in the
server (max_tokens, temperature, top_p, top_k, min_p, penalties, seed, stop, ...), optional tools /
tool_choice, response_format, logprobs / top_logprobs and chat_template_kwargs {thinking, preserve_thinking}},
parsed by hybrid/apps/openai_protocol.py exactly as the server parses a request (unknown fields are ignored,
as there). Requests go through the engine together (many added, then stepped until done), and each result is
appended and flushed the moment it finishes, in finishing order. Re-running the same command skips every
input already answered in the output and does the rest, so each input line gets exactly one record: a
result, or an error record {"id", "line", "error", "param"} for a malformed line, a bad field, a duplicate
id, a prompt longer than the context, or a sequence that failed while generating (the engine's
finish_reason "error": that record alone fails, the job goes on and exits 0). A record cut short by a crash
(no final newline) is dropped and redone. `retry_errors=True` drops the error records first (the output is
rewritten without them, atomically) so a rerun retries those lines.

One writer per output: a run holds an exclusive lock (flock) on OUTPUT.lock for its whole life; a second
run on the same output is refused with the holder's pid (the lock dies with its process, SIGKILL included;
the OUTPUT.lock file itself stays, harmless: the flock is the lock, not the file).
`check_paths(input, output)` checks the paths (input a regular file, output not the input, not a folder,
its folder present and writable, not locked) and is meant to be called before the model loads.
Checked by tests/test_batch.py (resume after SIGKILL, malformed and poisonous lines, generation failures,
two runs on one output, output == input, output paths, retry of error records).
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:           # not POSIX: no lock (documented)
    fcntl = None

from tqdm import tqdm

import hybrid.apps.openai_protocol as protocol
from hybrid.chat import chat_sampling
from hybrid.text.output_parser import parse_output
from hybrid.apps.openai_protocol import FieldError


class BatchPathError(ValueError):
    """--input / --output unusable (missing, a folder, the same file, locked by another run)."""


@dataclass
class _Entry:
    line: int
    key: str                  # what marks this input as answered in the output
    id: object = None
    request: dict | None = None
    error: str | None = None
    param: str | None = None
    media: list | None = None  # image embeddings of a chat line (hybrid.engine.MediaSpan), set by _prepare


def _key(record_or_id, line: int | None = None, duplicate: bool = False) -> str:
    """Inputs with a usable id are keyed by it; a duplicate or an id-less line by its line number."""
    if duplicate:
        return f"dup-line:{line}"
    if record_or_id is None:
        return f"line:{line}"
    return "id:" + json.dumps(record_or_id, sort_keys=True)


def answered(output: Path, retry_errors: bool = False) -> set[str]:
    """Keys of the inputs the output already answers; drops a torn last record (no newline).
    retry_errors: error records do not count as answers."""
    output = Path(output)
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
        if isinstance(rec, dict) and "line" in rec and not (retry_errors and "error" in rec):
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
            except (ValueError, RecursionError) as e:     # bad JSON, a 5000-digit number, deep nesting
                entries.append(_Entry(n, _key(None, n), error=f"line {n} is not valid JSON: "
                                                             f"{type(e).__name__}: {str(e)[:200]}"))
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


def _kind(path: Path) -> str | None:
    """None for a regular file; else what it is, in words ('missing', 'a folder', ...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    return "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


class OutputLock:
    """An exclusive flock on OUTPUT.lock, held while the run writes; refused (BatchPathError) if held."""

    def __init__(self, output: Path):
        self.path = lock_path(output)
        self.f = None
        if fcntl is None:
            return
        try:
            self.f = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            raise BatchPathError(f"--output {output}: cannot create the lock file {self.path} ({e.strerror})") \
                from None
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.seek(0)
            holder = self.f.read(40).strip() or "unknown"
            self.f.close()
            raise BatchPathError(f"--output {output} is being written by another hybrid batch run (pid {holder}, "
                                 f"lock {self.path}): wait for it to finish, or choose another --output") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"{os.getpid()}\n")
        self.f.flush()

    def release(self) -> None:
        if self.f is not None:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
            self.f.close()
            self.f = None


def check_paths(input_path, output_path) -> tuple[Path, Path]:
    """BatchPathError, with what to do, unless the input is a readable regular file and the output can be
    appended to by this run; meant to be called before the model loads (the CLI does)."""
    inp, out = Path(input_path), Path(output_path)
    kind = _kind(inp)
    if kind is not None:
        raise BatchPathError(f"--input {inp}: " + ("no such file" if kind == "missing" else f"is {kind}"))
    same = out.resolve() == inp.resolve()
    if not same and _kind(out) is None:
        same = os.path.samefile(inp, out)
    if same:
        raise BatchPathError(f"--output {out} is the input file: results would be appended to the requests; "
                             "choose another --output")
    kind = _kind(out)
    if kind not in (None, "missing"):
        raise BatchPathError(f"--output {out}: is {kind}; give the path of a file (it is created, or appended to)")
    parent = out.parent
    if not parent.is_dir():
        raise BatchPathError(f"--output {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (kind is None and not os.access(out, os.W_OK)):
        raise BatchPathError(f"--output {out}: not writable by this user")
    OutputLock(out).release()                         # refuses now, not after minutes of loading
    return inp, out


def drop_error_records(output: Path) -> int:
    """Rewrite the output without its error records (temporary file + rename: a crash keeps the old one)."""
    if not output.is_file():
        return 0
    keep, dropped = [], 0
    for raw in output.read_bytes().splitlines(keepends=True):
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and "error" in rec and "line" in rec:
            dropped += 1
        else:
            keep.append(raw)
    if dropped:
        tmp = output.with_name(f".{output.name}.retry.tmp")
        with open(tmp, "wb") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    return dropped


class _Writer:
    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def error(self, e: _Entry) -> None:
        self.write(error_record(e))


def error_record(e: _Entry) -> dict:
    rec = {"id": e.id, "line": e.line, "error": e.error, "param": e.param}
    if e.request and "duplicate_of_line" in e.request:
        rec["duplicate_of_line"] = e.request["duplicate_of_line"]
    return rec


def _prepare(llm, e: _Entry, defaults: dict, max_tokens: int | None):
    """-> (prompt ids, SamplingParams, chat args or None); FieldError for a bad field."""
    req = e.request
    if protocol.choices(req) != 1:
        raise FieldError("n", "n > 1 is not supported in a batch job (one record per id): "
                              "write one line per choice, with its own id")
    if req.get("messages") is not None:
        args = protocol.chat_args(req)
        params = protocol.sampling_params(req, defaults, max_tokens=max_tokens, thinking=args.thinking,
                                          logprobs=protocol.chat_logprobs(req))
        prompt, e.media = protocol.chat_inputs(llm, args)      # images: data URLs, or paths next to the input
        return prompt, protocol.constrain(llm, args.constraint, chat_sampling(params)), args
    if req.get("response_format") is not None:
        raise FieldError("response_format", "response_format applies to 'messages' lines, not to 'prompt'")
    params = protocol.sampling_params(req, defaults, max_tokens=max_tokens,
                                      logprobs=protocol.completion_logprobs(req))
    prompts = protocol.completion_prompts(llm, req)
    if len(prompts) != 1:
        raise FieldError("prompt", "one prompt per line (a string or a list of token ids)")
    return prompts[0], params, None


def prepare_entry(llm, e: _Entry, defaults: dict, max_tokens: int | None):
    """(prompt ids, SamplingParams, chat args), or None after setting e.error / e.param (write
    error_record(e)): any failure while preparing one line fails that line alone."""
    try:
        return _prepare(llm, e, defaults, max_tokens)
    except FieldError as err:
        e.error, e.param = f"line {e.line}: {err.message}", err.param
    except ValueError as err:                 # the tokenizer's / engine's: too long, bad ids
        e.error, e.param = f"line {e.line}: {err}", "messages" if "messages" in e.request else "prompt"
    except Exception as err:                  # a failing chat template, a grammar library error, ...
        e.error, e.param = f"line {e.line}: {type(err).__name__}: {err}", None
    return None


def result_record(e: _Entry, args, text: str, token_ids: list[int], last, logprobs: list | None = None,
            tokenizer=None) -> dict:
    """The line's result record; an error record when the engine failed the sequence (finish_reason
    "error"). `logprobs`: the entries of every generated token, when asked for."""
    if last.finish_reason == "error":
        e.error = f"line {e.line}: generation failed: {getattr(last, 'error', None) or 'unknown error'}"
        e.param = None
        return {**error_record(e), "finish_reason": "error"}
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
    if logprobs is not None:
        pairs = list(zip(token_ids, logprobs))
        rec["logprobs"] = ({"content": protocol.logprobs_chat(tokenizer, pairs)} if args is not None
                           else protocol.logprobs_completion(tokenizer, pairs))
    rec["usage"] = protocol.usage(len(last.prompt_token_ids), len(token_ids), last.cached_prompt_tokens)
    m = last.metrics or {}
    rec["metrics"] = {k: round(m[k], 4) for k in ("time_to_first_token_s", "decode_tokens_per_s") if k in m}
    return rec


def run_batch(llm, input_path, output_path, max_tokens: int | None = None, progress: bool = True,
              retry_errors: bool = False) -> dict:
    """Answer every input line not yet answered in output_path. Returns counts. retry_errors: lines
    answered by an error record are redone (their error records are dropped first)."""
    input_path, output_path = check_paths(input_path, output_path)
    lock = OutputLock(output_path)
    try:
        retried = drop_error_records(output_path) if retry_errors else 0
        return _run(llm, input_path, output_path, max_tokens, progress, retried)
    finally:
        lock.release()


def _run(llm, input_path: Path, output_path: Path, max_tokens, progress: bool, retried: int) -> dict:
    done = answered(output_path)
    todo = [e for e in read_entries(input_path) if e.key not in done]
    defaults = protocol.generation_defaults(llm.model_dir)
    engine = llm.engine
    images = getattr(llm, "images", None)
    limits = images.limits if images is not None else None
    if images is not None:                     # relative image paths in records: next to the input file
        images.limits = dataclasses.replace(limits, base_dir=str(input_path.parent.resolve()))
    window = 2 * engine.max_batch              # requests held in the engine at once
    writer = _Writer(output_path)
    bar = tqdm(total=len(todo), desc="batch", unit="req", disable=not progress, dynamic_ncols=True)
    live: dict[str, tuple] = {}                 # request id -> (entry, chat args, text parts, token ids, logprobs)
    counts = {"skipped": len(done), "results": 0, "errors": 0, "retried": retried}
    t0, n_tokens = time.perf_counter(), 0
    pending = iter(todo)
    try:
        while True:
            while len(live) < window:
                e = next(pending, None)
                if e is None:
                    break
                if e.error is None:
                    got = prepare_entry(llm, e, defaults, max_tokens)
                    if got is not None:
                        prompt, params, args = got
                        try:
                            rid = engine.add_request(prompt, params, media=e.media)
                            e.media = None                 # the engine holds them now
                            live[rid] = (e, args, [], [], [] if params.logprobs is not None else None)
                            continue
                        except ValueError as err:          # the engine's: too long, bad ids
                            e.error = f"line {e.line}: {err}"
                            e.param = "messages" if "messages" in e.request else "prompt"
                writer.error(e)
                counts["errors"] += 1
                bar.update(1)
            if not live:
                break
            for d in engine.step():
                if d.request_id not in live:
                    continue
                e, args, parts, ids, lps = live[d.request_id]
                parts.append(d.text)
                ids += d.token_ids
                if lps is not None:
                    lps += getattr(d, "logprobs", None) or []
                n_tokens += len(d.token_ids)
                if d.finish_reason is not None:
                    del live[d.request_id]
                    rec = result_record(e, args, "".join(parts), ids, d, lps, llm.tokenizer)
                    writer.write(rec)
                    counts["errors" if "error" in rec else "results"] += 1
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
        if images is not None:                 # the LLM's own limits again for its other callers
            images.limits = limits
    counts["tokens_per_s"] = n_tokens / max(time.perf_counter() - t0, 1e-9)
    return counts
