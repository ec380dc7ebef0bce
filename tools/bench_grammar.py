"""Per-token mask cost of grammar libraries at K2.6's vocabulary size (163,840 ids).
Usage: python tools/bench_grammar.py TOKENIZER_DIR [tokens]   (TOKENIZER_DIR: tiktoken.model + tokenizer_config.json,
e.g. written by hybrid.synthetic.write_tokenizer_files(dir, 163840)). One JSON schema (nested object, arrays,
enum, numbers, bounded strings); a seeded random walk through allowed tokens; time = mask computation per token
(the step that sits on the critical path if not overlapped) and the advance, compile time separately.
libraries not installed are skipped (pip install llguidance xgrammar outlines-core). Not run by the tests."""
import json, random, statistics, sys, time
import numpy as np
from hybrid.text.tokenizer import Tokenizer

V = 163840
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "score": {"type": "number"}, "kind": {"enum": ["a", "b", "c"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}

def allowed_from_bits(bits, n):
    return np.flatnonzero(np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little")[:n])

def walk(name, compute, advance, n, rng, to_allowed):
    """compute(): the library's mask call only (timed); to_allowed(raw) -> token ids (not timed)."""
    times, adv = [], []
    for _ in range(n):
        t = time.perf_counter(); raw = compute(); times.append(time.perf_counter() - t)
        allowed = to_allowed(raw)
        if len(allowed) == 0: break
        tok = int(allowed[rng.randrange(len(allowed))])
        t = time.perf_counter(); fin = advance(tok); adv.append(time.perf_counter() - t)
        if fin: break
    times.sort()
    print(f"{name:14s} tokens={len(times):4d} mask mean={statistics.mean(times)*1e6:8.0f}us p50={times[len(times)//2]*1e6:8.0f}us "
          f"p99={times[int(len(times)*0.99)]*1e6:8.0f}us max={times[-1]*1e6:8.0f}us advance mean={statistics.mean(adv)*1e6:6.0f}us", flush=True)

FREE = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}   # free text inside a string

def main():
    global SCHEMA
    tok = Tokenizer.from_pretrained(sys.argv[1]); n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    if len(sys.argv) > 3 and sys.argv[3] == "free": SCHEMA = FREE
    assert tok.vocab_size == V, tok.vocab_size
    vocab = [tok.id_to_token(i) for i in range(V)]
    eos = tok.im_end_id
    import llguidance as llg
    t = time.perf_counter()
    llt = llg.LLTokenizer.from_tiktoken(encoder=tok.mergeable_ranks, special_tokens=tok.special_tokens, pattern=tok.pat_str, eos_token=eos, n_vocab=V)
    t1 = time.perf_counter()
    m = llg.LLMatcher(llt, llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False}))
    print(f"llguidance {llg.__version__ if hasattr(llg,'__version__') else ''}: tokenizer {t1-t:.2f}s, compile {time.perf_counter()-t1:.3f}s")
    for seed in range(5):
        m = llg.LLMatcher(llt, llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False}))
        walk("llguidance", m.compute_bitmask, lambda k: (m.consume_token(k), m.is_stopped())[1], n, random.Random(seed), lambda b: allowed_from_bits(b, V))
    import xgrammar as xgr
    t = time.perf_counter()
    info = xgr.TokenizerInfo([b if i not in tok.special_ids else b"" for i, b in enumerate(vocab)], xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[eos])
    comp = xgr.GrammarCompiler(info, max_threads=2); t1 = time.perf_counter()
    cg = comp.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False); t2 = time.perf_counter()
    print(f"xgrammar: tokenizer {t1-t:.2f}s, compile {t2-t1:.3f}s")
    bm = xgr.allocate_token_bitmask(1, V)
    for seed in range(5):
        gm = xgr.GrammarMatcher(cg)
        walk("xgrammar", lambda: gm.fill_next_token_bitmask(bm), lambda k: (gm.accept_token(k), gm.is_terminated())[1], n,
             random.Random(seed), lambda _: allowed_from_bits(bm.numpy().tobytes(), V))
    import outlines_core as oc
    t = time.perf_counter()
    mp = {}
    for i, b in enumerate(vocab):
        if i != eos and i not in tok.special_ids and b: mp.setdefault(b, []).append(i)
    voc = oc.Vocabulary(eos, mp); t1 = time.perf_counter()
    rx = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    try:
        idx = oc.Index(rx, voc)
    except Exception as e:
        print("outlines-core: index failed:", type(e).__name__, str(e)[:200]); return
    t2 = time.perf_counter()
    print(f"outlines-core: vocabulary {t1-t:.2f}s, index (compile) {t2-t1:.2f}s")
    g = oc.Guide(idx)
    walk("outlines-core", g.get_tokens, lambda k: (g.advance(k), g.is_finished())[1], n, random.Random(0), np.asarray)

main()
