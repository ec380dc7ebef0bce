"""`hybrid batch`: every input line answered exactly once (results, error records for malformed lines,
bad fields, duplicate ids, too-long prompts), requests stepped together, and a rerun after a crash
(simulated with HYBRID_BATCH_CRASH_AFTER, plus a torn last record) completes only the rest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hybrid
from hybrid.apps.batch import CRASH_ENV, run_batch
from hybrid.synthetic import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MAX_CONTEXT = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("batch") / "tiny", "tiny")


@pytest.fixture(scope="module")
def llm(model_dir):
    return hybrid.LLM(model_dir, expert_backend="torch", progress=False, max_context=MAX_CONTEXT, max_batch=4)


def _good_lines(n: int) -> list[str]:
    lines = []
    for i in range(n):
        if i % 3 == 0:
            req = {"id": f"c{i}", "messages": [{"role": "user", "content": f"question {i}"}],
                   "chat_template_kwargs": {"thinking": i % 2 == 0}}
        elif i % 3 == 1:
            req = {"id": f"p{i}", "prompt": f"prompt number {i}", "temperature": 0.7, "seed": i}
        else:
            req = {"id": i, "prompt": [5, 6, 7, i], "top_k": 5}
        lines.append(json.dumps({**req, "max_tokens": 5, "ignore_eos": True}))
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


def test_resume_after_crash_answers_each_id_exactly_once(model_dir, llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = _good_lines(9) + ["{broken"]
    inp.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "hybrid", "batch", str(model_dir), "--input", str(inp), "--output", str(out),
           "--expert-backend", "torch", "--max-context", str(MAX_CONTEXT), "--max-batch", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), CRASH_ENV: "3"}
    crashed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert crashed.returncode == 3, crashed.stderr
    assert len(_records(out)) == 3
    with open(out, "a") as f:                      # a record torn by the crash
        f.write('{"id": "p4", "line": 5, "te')
    counts = run_batch(llm, inp, out, progress=False)
    assert counts["skipped"] == 3 and counts["results"] + counts["errors"] == 7
    recs = _records(out)
    keys = [r["line"] for r in recs]
    assert sorted(keys) == list(range(1, 11)), keys      # every line exactly once
    assert [r["line"] for r in recs if "error" in r] == [10]
