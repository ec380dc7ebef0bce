"""`hybrid batch`: every input line answered exactly once (results, error records for malformed lines,
bad fields, duplicate ids, too-long prompts), requests stepped together, and a rerun after the process
was killed mid-job (a real `python -m hybrid batch` subprocess, SIGKILL once N records are on disk,
plus a torn last record) completes only the rest and loses nothing that had finished.
Everything runs on the default expert backend (expert_backend="auto"), the one a user gets: no test
here compares tokens against another run, so nothing needs the torch backend's determinism.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import hybrid
from hybrid.apps.batch import run_batch
from hybrid.synthetic import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MAX_CONTEXT = 256
FAST_BACKENDS = ("numba", "kt")    # what "auto" picks when a fast CPU backend runs; torch would be the fallback
KILL_AFTER = 3                     # complete records on disk before the SIGKILL
START_TIMEOUT_S = 600              # loading + the first records, on a slow, busy 2-core machine
KILL_ATTEMPTS = 3                  # each with twice the work, should the job finish before the kill


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("batch") / "tiny", "tiny")


@pytest.fixture(scope="module")
def llm(model_dir):
    llm = hybrid.LLM(model_dir, progress=False, max_context=MAX_CONTEXT, max_batch=4)     # default backend
    assert llm.expert_backend in FAST_BACKENDS, f"auto fell back to {llm.expert_backend!r}"
    return llm


def _good_lines(n: int, max_tokens=lambda i: 5) -> list[str]:
    lines = []
    for i in range(n):
        if i % 3 == 0:
            req = {"id": f"c{i}", "messages": [{"role": "user", "content": f"question {i}"}],
                   "chat_template_kwargs": {"thinking": i % 2 == 0}}
        elif i % 3 == 1:
            req = {"id": f"p{i}", "prompt": f"prompt number {i}", "temperature": 0.7, "seed": i}
        else:
            req = {"id": i, "prompt": [5, 6, 7, i], "top_k": 5}
        lines.append(json.dumps({**req, "max_tokens": max_tokens(i), "ignore_eos": True}))
    return lines


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_answers_every_line_once_with_error_records(llm, tmp_path):
    bad = [
        "{not json",                                                            # line 7
        "[1, 2, 3]",                                                            # line 8
        json.dumps({"prompt": "no id"}),                                        # line 9
        json.dumps({"id": "c0", "prompt": "duplicate"}),                        # line 10
        json.dumps({"id": "both", "prompt": "x", "messages": []}),              # line 11
        json.dumps({"id": "hot", "prompt": "x", "temperature": -1}),            # line 12
        json.dumps({"id": "long", "prompt": "word " * (MAX_CONTEXT + 20)}),     # line 13
        json.dumps({"id": "role", "messages": [{"role": "robot", "content": "x"}]}),  # line 14
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(_good_lines(6) + bad) + "\n\n")
    seen = []
    step = llm.engine.step
    llm.engine.step = lambda: seen.append(len(d := step())) or d     # how many sequences per step
    try:
        counts = run_batch(llm, inp, out, progress=False)
    finally:
        del llm.engine.step
    recs = _records(out)
    assert counts["results"] == 6 and counts["errors"] == 8 and len(recs) == 14
    assert sorted(r["line"] for r in recs) == list(range(1, 15))
    errors = {r["line"]: r for r in recs if "error" in r}
    assert set(errors) == set(range(7, 15))
    assert "line 7" in errors[7]["error"] and errors[9]["param"] == "id"
    assert errors[10]["duplicate_of_line"] == 1 and errors[10]["id"] == "c0"
    assert errors[12]["param"] == "temperature" and "context" in errors[13]["error"]
    assert errors[14]["param"] == "messages[0].role"
    for r in recs:
        if "error" not in r:
            assert r["usage"]["completion_tokens"] == 5 and r["finish_reason"] == "length"
            assert ("message" in r) == str(r["id"]).startswith("c")
    assert max(seen) >= 4                          # requests were stepped together
    again = run_batch(llm, inp, out, progress=False)
    assert (again["skipped"], again["results"], again["errors"]) == (14, 0, 0)
    assert len(_records(out)) == 14                # a rerun of a finished job adds nothing


def _complete_records(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _kill_mid_job(model_dir: Path, inp: Path, out: Path, log: Path) -> bool:
    """Run `python -m hybrid batch` on the default backend and SIGKILL it once KILL_AFTER records are on
    disk. True if it was killed; False if it finished the whole job first (the caller adds work)."""
    cmd = [sys.executable, "-m", "hybrid", "batch", str(model_dir), "--input", str(inp), "--output", str(out),
           "--max-context", str(MAX_CONTEXT), "--max-batch", "2", "--no-progress"]
    with open(log, "wb") as err:
        p = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _complete_records(out) < KILL_AFTER:
            rc = p.poll()
            if rc is not None:
                assert rc == 0, f"batch exited with {rc}:\n{log.read_text()[-3000:]}"
                return False
            assert time.monotonic() < deadline, f"no {KILL_AFTER} records after {START_TIMEOUT_S} s:\n" \
                                                f"{log.read_text()[-3000:]}"
            time.sleep(0.01)
        if p.poll() is not None:                   # it ended between the last two looks
            assert p.returncode == 0, log.read_text()[-3000:]
            return False
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
        return True
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=60)


def test_resume_after_sigkill_answers_each_id_exactly_once(model_dir, llm, tmp_path):
    # lengths differ per line, so records finish out of input order and the rerun must skip by id,
    # not by how many records there are; max_tokens + the longest prompt stays inside MAX_CONTEXT
    def max_tokens(i):
        return 16 + (i * 29) % 80

    for attempt in range(KILL_ATTEMPTS):
        n_good = 24 * 2 ** attempt
        lines = _good_lines(n_good, max_tokens) + ["{broken"]
        inp, out = tmp_path / f"in{attempt}.jsonl", tmp_path / f"out{attempt}.jsonl"
        inp.write_text("\n".join(lines) + "\n")
        if _kill_mid_job(model_dir, inp, out, tmp_path / f"log{attempt}.txt") \
                and _complete_records(out) < len(lines):
            break
    else:
        pytest.fail(f"the batch job finished before the SIGKILL {KILL_ATTEMPTS} times; give it more work")
    total = len(lines)
    data = out.read_bytes()
    finished = data[:data.rfind(b"\n") + 1]        # what the killed run had written in full
    n_done = finished.count(b"\n")
    assert KILL_AFTER <= n_done < total
    done_lines = {json.loads(r)["line"] for r in finished.splitlines()}
    if data == finished:                           # a record torn by the kill (the kill may have torn one)
        pending = next(n for n in range(1, total + 1) if n not in done_lines)
        with open(out, "ab") as f:
            f.write(f'{{"id": "x", "line": {pending}, "te'.encode())

    counts = run_batch(llm, inp, out, progress=False)
    assert counts["skipped"] == n_done and counts["results"] + counts["errors"] == total - n_done
    after = out.read_bytes()
    assert after.startswith(finished)              # nothing finished was lost or rewritten; the torn part is gone
    recs = _records(out)
    assert sorted(r["line"] for r in recs) == list(range(1, total + 1))    # every line exactly once
    ids = Counter(r["id"] for r in recs if "error" not in r)
    expected = Counter(json.loads(line)["id"] for line in lines[:-1])
    assert ids == expected and max(ids.values()) == 1                   # every id answered exactly once
    assert [r["line"] for r in recs if "error" in r] == [total]
    for r in recs:
        if "error" not in r:
            i = int(str(r["id"]).lstrip("cp"))
            assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == max_tokens(i)
