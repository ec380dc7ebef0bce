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


# ---- poisonous records, generation failures, one writer, paths checked before loading ---------------
POISON = [   # (line text, expected: "ok" = a result record, or the param named by the error record)
    ('{"id": "t40", "prompt": [5, 6], "temperature": 1e-40}', "ok"),          # below 1e-5: greedy
    ('{"id": "t300", "prompt": [5, 6], "temperature": 1e-300}', "ok"),
    ('{"id": "t64", "prompt": [5, 6], "temperature": 18446744073709551616}', "temperature"),
    ('{"id": "r64", "prompt": [5, 6], "repetition_penalty": 18446744073709551616}', "repetition_penalty"),
    ('{"id": "nan", "prompt": [5, 6], "temperature": NaN}', "temperature"),
    ('{"id": "inf", "prompt": [5, 6], "top_p": Infinity}', "top_p"),
    ('{"id": "str", "prompt": [5, 6], "temperature": "hot"}', "temperature"),
    ('{"id": "bool", "prompt": [5, 6], "max_tokens": true}', "max_tokens"),
    ('{"id": "fk", "prompt": [5, 6], "top_k": 1.5}', "top_k"),
    ('{"id": "seed", "prompt": [5, 6], "seed": 18446744073709551616}', "seed"),
    ('{"id": "stop", "prompt": [5, 6], "stop": 5}', "stop"),
    ('{"id": "msgs", "messages": "hello"}', "messages"),
    ('{"id": "unknown", "prompt": [5, 6], "frobnicate": {"x": 1}, "temperature": 0.5}', "ok"),
    ('{"id": "bigmax", "prompt": [5, 6], "max_tokens": 1000000000000000000, "ignore_eos": true}', "ok"),
    ('{"id": "hugemax", "prompt": [5, 6], "max_tokens": 18446744073709551616}', "max_tokens"),
    ('{"id": "digits", "prompt": [5, 6], "seed": ' + "9" * 5000 + "}", None),          # not valid JSON
    ('{"id": "deep", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
    ('{"id": "n2", "prompt": [5, 6], "n": 2}', "n"),
    ('{"id": "rf", "prompt": [5, 6], "response_format": {"type": "json_object"}}', "response_format"),
    ('{"id": "tok", "prompt": [5, 99999999]}', "prompt"),
]


def test_poisonous_records_fail_alone(llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = _good_lines(4)
    inp.write_text("\n".join(good + [p for p, _ in POISON]) + "\n")
    counts = run_batch(llm, inp, out, max_tokens=4, progress=False)
    recs = _records(out)
    assert sorted(r["line"] for r in recs) == list(range(1, len(good) + len(POISON) + 1))   # one per line
    by_line = {r["line"]: r for r in recs}
    for i, (text, want) in enumerate(POISON, len(good) + 1):
        r = by_line[i]
        if want == "ok":
            assert "error" not in r and r["usage"]["completion_tokens"] >= 1, (text[:80], r)
        else:
            assert "error" in r and r.get("param") == want, (text[:80], r)
    assert all("error" not in by_line[i] for i in range(1, len(good) + 1))
    assert by_line[len(good) + POISON.index(next(p for p in POISON if p[0].startswith('{"id": "bigmax"'))) + 1][
        "finish_reason"] == "length"                 # capped by the context
    assert counts["results"] == 4 + sum(w == "ok" for _, w in POISON)


def test_poisonous_input_through_the_cli_exits_0(model_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(_good_lines(2) + [p for p, _ in POISON]) + "\n")
    cmd = [sys.executable, "-m", "hybrid", "batch", str(model_dir), "--input", str(inp), "--output", str(out),
           "--max-context", str(MAX_CONTEXT), "--max-batch", "4", "--max-tokens", "3", "--no-progress"]
    p = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=START_TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(r["line"] for r in _records(out)) == list(range(1, len(POISON) + 3))


class _Broken:
    """A constraint whose mask raises: the engine fails that sequence alone (finish_reason "error")."""

    def mask(self, logits):
        raise RuntimeError("broken grammar")

    def advance(self, token):
        pass


def test_generation_failure_is_an_error_record_and_retry_redoes_it(llm, tmp_path, monkeypatch):
    import dataclasses
    from hybrid.apps import batch
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(_good_lines(5)) + "\n")
    real = batch._prepare

    def poisoned(llm_, e, defaults, max_tokens):
        prompt, params, args = real(llm_, e, defaults, max_tokens)
        if e.id == "p1":
            params = dataclasses.replace(params, constraint=_Broken())
        return prompt, params, args
    monkeypatch.setattr(batch, "_prepare", poisoned)
    counts = run_batch(llm, inp, out, progress=False)
    recs = {r["id"]: r for r in _records(out)}
    assert counts["errors"] == 1 and counts["results"] == 4 and len(recs) == 5
    assert recs["p1"]["finish_reason"] == "error" and "broken grammar" in recs["p1"]["error"]
    monkeypatch.setattr(batch, "_prepare", real)
    again = run_batch(llm, inp, out, progress=False)                  # without retry: nothing to do
    assert (again["results"], again["errors"]) == (0, 0)
    again = run_batch(llm, inp, out, progress=False, retry_errors=True)
    assert (again["retried"], again["results"], again["errors"]) == (1, 1, 0)
    recs = _records(out)
    assert sorted(r["line"] for r in recs) == [1, 2, 3, 4, 5] and not any("error" in r for r in recs)


def test_logprobs_and_structured_fields_in_batch_lines(llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "lp-chat", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2,
              "max_tokens": 4, "ignore_eos": True},
             {"id": "lp-prompt", "prompt": [5, 6, 7], "logprobs": 3, "max_tokens": 4, "ignore_eos": True},
             {"id": "json", "messages": [{"role": "user", "content": "json please"}], "max_tokens": 40,
              "response_format": {"type": "json_object"}, "chat_template_kwargs": {"thinking": False}},
             {"id": "badrf", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}]
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    run_batch(llm, inp, out, progress=False)
    recs = {r["id"]: r for r in _records(out)}
    content = recs["lp-chat"]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    lp = recs["lp-prompt"]["logprobs"]
    assert len(lp["token_logprobs"]) == 4 and all(len(t) <= 3 for t in lp["top_logprobs"])
    assert "error" not in recs["json"], recs["json"]
    if recs["json"]["finish_reason"] == "stop":
        assert isinstance(json.loads(recs["json"]["message"]["content"]), dict)
    assert recs["badrf"]["param"] == "response_format.type"


def test_a_second_run_on_the_same_output_is_refused(llm, tmp_path):
    from hybrid.apps.batch import BatchPathError, check_paths
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(_good_lines(2)) + "\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, pathlib\n"
                               "from hybrid.apps.batch import OutputLock\n"
                               f"lock = OutputLock(pathlib.Path({str(out)!r}))\nprint('locked', flush=True)\n"
                               "time.sleep(600)"],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for attempt in (lambda: check_paths(inp, out), lambda: run_batch(llm, inp, out, progress=False)):
            with pytest.raises(BatchPathError, match=f"another hybrid batch run \\(pid {holder.pid}"):
                attempt()
        assert not out.exists()
    finally:
        holder.kill()                                 # the lock dies with its process (SIGKILL included)
        holder.wait(timeout=60)
    assert run_batch(llm, inp, out, progress=False)["results"] == 2


def test_paths_are_checked_before_the_model_loads(tmp_path):
    from hybrid.apps.batch import BatchPathError, check_paths
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": [5]}) + "\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link.jsonl").symlink_to(inp)
    os.link(inp, tmp_path / "hard.jsonl")
    cases = [(inp, inp, "is the input file"), (inp, tmp_path / "link.jsonl", "is the input file"),
             (inp, tmp_path / "hard.jsonl", "is the input file"), (inp, tmp_path / "folder", "is a folder"),
             (inp, tmp_path / "nope" / "out.jsonl", "does not exist"), (tmp_path / "missing.jsonl", tmp_path / "o",
                                                                        "no such file"),
             (tmp_path / "folder", tmp_path / "o", "--input .* is a folder")]
    for i, o, words in cases:
        with pytest.raises(BatchPathError, match=words):
            check_paths(i, o)
        with pytest.raises(BatchPathError, match=words):
            run_batch(None, i, o, progress=False)         # refused before the model would be touched
    assert inp.read_text().count("\n") == 1
    assert check_paths(inp, tmp_path / "out.jsonl") == (inp, tmp_path / "out.jsonl")
