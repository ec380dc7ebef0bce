"""hybrid.tokenizer against the tiktoken package built from the same ranks, pattern and
specials; synthetic tokenizer files in the real checkpoint layout."""
import base64
import json
import random
import time
import unicodedata

import pytest

from hybrid.synthetic.tokenizer_files import CORPUS, _generated_text, write_tokenizer_files
from hybrid.text.tokenizer import (MAX_NO_WHITESPACES_CHARS, PAT_STR, Tokenizer,
                              default_special_tokens)

tiktoken = pytest.importorskip("tiktoken")

TEXTS = [
    "",
    "Hello, world!",
    "Hello world's, they're, I'M, WE'LL, you'd",
    CORPUS,
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\r\n",
    "人工智能正在改变世界。我们今天去公园散步，天气非常好！",
    "東京は日本の首都です。カタカナ、ひらがな、漢字",
    "한국어 문장입니다. Привет мир. Ελληνικά. مرحبا. नमस्ते",
    "😀😃😄 👨‍👩‍👧‍👦 🇫🇷 ❤️ e\u0301 a\u0308\u0323 ﬁ ß ſ K",
    "   leading and trailing   \n\n\n   \t\t \r\n \u00a0\u2003\u3000 x",
    "1234567890 3.14159 -273.15 1e-9 0xDEADBEEF 12,345,678",
    "a" * 5000 + " " * 3000 + "b\n" * 1000,
    "ÀÉÎÕÜ àéîõü ÇçÑñ ÅåØøÆæ łŁśŚ",
    "\x00\x01\x7f \ufffd \ud7ff \ue000 \U0010fffd",
    "<|im_end|> [BOS] <think>reasoning</think> <|tool_call_begin|>",
]


def _random_text(rng, n):
    pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x3000, 0x30FF),
             (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x9, 0xD)]
    return "".join(chr(rng.randint(*rng.choice(pools))) for _ in range(n))


@pytest.fixture(scope="module", params=[2304, 16640])
def tok_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tok{request.param}")
    write_tokenizer_files(d, request.param)
    return d


@pytest.fixture(scope="module")
def pair(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    enc = tiktoken.Encoding("kimi-synthetic", pat_str=PAT_STR, mergeable_ranks=tok.mergeable_ranks,
                            special_tokens=tok.special_tokens)
    return tok, enc


def test_files_layout(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    lines = (tok_dir / "tiktoken.model").read_text().splitlines()
    n = len(lines)
    assert [int(line.split()[1]) for line in lines] == list(range(n))
    dec = cfg["added_tokens_decoder"]
    assert sorted(map(int, dec)) == list(range(n, n + 256))
    assert dec[str(n)]["content"] == "[BOS]" and dec[str(n + 2)]["content"] == "<|im_end|>"
    assert dec[str(n + 5)]["content"] == f"<|reserved_token_{n + 5}|>"
    assert dec[str(n + 23)]["content"] == "</think>" and dec[str(n + 255)]["content"] == "[PAD]"
    assert cfg["auto_map"]["AutoTokenizer"][0] == "tokenization_kimi.TikTokenTokenizer"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == \
        ("[BOS]", "[EOS]", "[PAD]", "[UNK]")
    assert "<|im_assistant|>assistant<|im_middle|>" in (tok_dir / "chat_template.jinja").read_text()


def test_tiktoken_model_is_valid_bpe(tok_dir):
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(str(tok_dir / "tiktoken.model"))
    assert [ranks[bytes([i])] for i in range(256)] == list(range(256))
    for tb, r in ranks.items():
        if len(tb) > 1:  # every merged token is a pair of lower-ranked tokens
            assert any(ranks.get(tb[:k], r) < r and ranks.get(tb[k:], r) < r
                       for k in range(1, len(tb))), tb


def test_real_special_ids():
    sp = default_special_tokens(163584)
    assert sp["[BOS]"] == 163584 and sp["<|im_end|>"] == 163586 and sp["<|im_system|>"] == 163594
    assert sp["<|tool_calls_section_begin|>"] == 163595 and sp["<|tool_call_end|>"] == 163599
    assert sp["<|im_middle|>"] == 163601 and sp["<|media_pad|>"] == 163605
    assert sp["<think>"] == 163606 and sp["</think>"] == 163607
    assert sp["[UNK]"] == 163838 and sp["[PAD]"] == 163839
    assert sp["<|reserved_token_163589|>"] == 163589 and len(sp) == 256


def test_named_specials(pair):
    tok, _ = pair
    n = tok.n_ordinary
    assert tok.vocab_size == n + 256
    assert tok.im_end_id == n + 2 and tok.eos_token_ids == [n + 2, n + 1]
    assert tok.special_tokens["<|tool_call_argument_begin|>"] == n + 14
    assert tok.think_end_id == n + 23 and tok.pad_id == n + 255 and tok.bos_id == n


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_matches_tiktoken(pair, i):
    tok, enc = pair
    text = TEXTS[i]
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
    assert tok.encode(text) == enc.encode(text, disallowed_special=())
    assert tok.encode_with_special(text) == enc.encode(text, allowed_special="all")
    assert tok.decode(tok.encode(text)) == text


def test_matches_tiktoken_random(pair):
    tok, enc = pair
    rng = random.Random(1)
    for _ in range(200):
        s = _random_text(rng, rng.randint(1, 60))
        assert tok.encode_ordinary(s) == enc.encode_ordinary(s), repr(s)
    s = _generated_text(rng, 50_000)
    assert tok.encode_ordinary(s) == enc.encode_ordinary(s)


def test_special_tokens_only_where_allowed(pair):
    tok, enc = pair
    text = "a<|im_end|>b<think>c[EOS]"
    plain = tok.encode(text)
    assert not any(tok.is_special(t) for t in plain)
    ids = tok.encode_with_special(text, allowed_special={"<|im_end|>"})
    assert ids == enc.encode(text, allowed_special={"<|im_end|>"}, disallowed_special=())
    assert [t for t in ids if tok.is_special(t)] == [tok.im_end_id]
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode_with_special(text, allowed_special={"<|nope|>"})


def test_pretokenizer_per_codepoint(tmp_path):
    """Each code point in a few contexts, with a vocabulary holding every test string as one
    token: the token count shows exactly where the pre-tokenizer split. Code points unassigned
    in Python's Unicode database are skipped: the `regex` module and tiktoken's Rust regex
    ship different Unicode versions for them."""
    rng = random.Random(0)
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000
           and unicodedata.category(chr(c)) != "Cn"]
    # all of Latin/Greek/Cyrillic, general and CJK punctuation, kana; a sample of the rest
    dense = [c for c in cps if c < 0x530 or 0x2000 <= c < 0x2070 or 0x3000 <= c < 0x3100]
    dense_set = set(dense)
    cps = dense + rng.sample([c for c in cps if c not in dense_set], 3000)
    ctx = ["a{}", "{}a", " {}", "{}{}", "A{}b", "中{}", "{}中", "1{}", "{}\n", "'{}", "{}'s"]
    strings = [f.format(chr(c), chr(c)) for c in cps for f in ctx]
    ranks = {bytes([i]): i for i in range(256)}
    for s in strings:
        ranks.setdefault(s.encode(), len(ranks))
    enc = tiktoken.Encoding("cp", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    tok = Tokenizer(ranks, {})
    ref = enc.encode_ordinary_batch(strings)
    bad = [s for s, r in zip(strings, ref) if tok.encode_ordinary(s) != r]
    assert not bad, bad[:10]


def _kimi_chunks(s, max_run):
    # tokenization_kimi.py `_split_whitespaces_or_nonwhitespaces`, written out independently
    cur_len, cur_space, start = 0, s[0].isspace() if s else False, 0
    for i in range(len(s)):
        now = s[i].isspace()
        if cur_space ^ now:
            cur_len, cur_space = 1, now
        else:
            cur_len += 1
            if cur_len > max_run:
                yield s[start:i]
                start, cur_len = i, 1
    yield s[start:]


def test_long_runs_are_chunked_like_the_checkpoint(pair):
    tok, enc = pair
    rng = random.Random(2)
    b64 = base64.b64encode(rng.randbytes(45_000)).decode()
    text = "x " + " " * 60_001 + b64 + "\n" + "ab" * 26_000 + " end"
    ref = []
    for piece in _kimi_chunks(text, MAX_NO_WHITESPACES_CHARS):
        ref += enc.encode(piece, disallowed_special=())
    assert tok.encode(text) == ref
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)  # no chunking here
    assert tok.decode(tok.encode(text)) == text


def test_long_input_is_fast(pair):
    tok, enc = pair
    text = _generated_text(random.Random(3), 300_000)
    t = time.perf_counter()
    ids = tok.encode(text)
    dt = time.perf_counter() - t
    assert ids == enc.encode_ordinary(text)
    assert len(ids) > 80_000 and dt < 10, (len(ids), dt)


def test_incremental_decoder_never_splits_characters(pair):
    tok, _ = pair
    text = "日本語のテキスト 😀👨‍👩‍👧 naïve café ∑ done"
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    pieces = [dec.add(i) for i in ids] + [dec.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # a lone byte of a multi-byte character only appears once the stream ends
    lone = tok.encode("é")[:1] if len(tok.encode("é")) > 1 else [tok.token_to_id(b"\xc3")]
    dec = tok.incremental_decoder()
    assert dec.add(lone) == "" and dec.finish() == "\ufffd"
    assert tok.decode(lone) == "\ufffd"


def test_decode_specials(pair):
    tok, _ = pair
    ids = tok.encode_with_special("hi<|im_end|>")
    assert tok.decode(ids) == "hi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


# ---- bad tokenizer files: TokenizerError naming the file and what is wrong --------------------------
from hybrid.text.tokenizer import TokenizerError, load_tokenizer  # noqa: E402


@pytest.fixture
def small_tok(tmp_path):
    write_tokenizer_files(tmp_path, 2304)
    return tmp_path


def _lines(d):
    return (d / "tiktoken.model").read_bytes().splitlines()


def _set_lines(d, lines):
    (d / "tiktoken.model").write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("damage,words", [
    (lambda ls: ls[:5] + [b"!!notbase64 5"] + ls[6:], "line 6: .* is not base64"),
    (lambda ls: ls[:5] + [ls[5].split()[0] + b" five"] + ls[6:], "line 6: rank .*five.* is not a non-negative"),
    (lambda ls: ls[:5] + [ls[5].split()[0] + b" -5"] + ls[6:], "line 6: rank .*-5"),
    (lambda ls: ls[:5] + [ls[5] + b" extra"] + ls[6:], "line 6: expected 'base64 rank'"),
    (lambda ls: ls[:5] + [ls[4].split()[0] + b" 5"] + ls[6:], "line 6: token .* already has rank 4"),
    (lambda ls: ls[:5] + [ls[5].split()[0] + b" 99999999"] + ls[6:], "rank 5 is missing"),
    (lambda ls: [], "no tokens"),
])
def test_bad_tiktoken_model_lines_are_named(small_tok, damage, words):
    _set_lines(small_tok, damage(_lines(small_tok)))
    with pytest.raises(TokenizerError, match=words) as e:
        Tokenizer.from_pretrained(small_tok)
    assert "tiktoken.model" in str(e.value)


@pytest.mark.parametrize("text,words", [
    ('{"added_tokens_decoder": ', "not valid JSON: .* line 1"),
    ("[1, 2]", "must be a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('{"added_tokens_decoder": [1]}', "'added_tokens_decoder' must be an object"),
    ('{"added_tokens_decoder": {"2100": {"special": true}}}', r"added_tokens_decoder\['2100'\] has no 'content'"),
    ('{"added_tokens_decoder": {"x": {"content": "<a>"}}}', "key 'x' is not a token id"),
    ('{"added_tokens_decoder": {"5": {"content": "<a>"}}}', "id 5 < 2048 ordinary tokens"),
    ('{"bos_token": 5}', "'bos_token' must be a string"),
])
def test_bad_tokenizer_config_is_named(small_tok, text, words):
    (small_tok / "tokenizer_config.json").write_text(text)
    with pytest.raises(TokenizerError, match=words) as e:
        Tokenizer.from_pretrained(small_tok)
    assert "tokenizer_config.json" in str(e.value)


def test_non_regular_tokenizer_files_are_refused(small_tok):
    import os
    (small_tok / "tokenizer_config.json").unlink()
    os.mkfifo(small_tok / "tokenizer_config.json")        # reading it would block
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not a regular file"):
        Tokenizer.from_pretrained(small_tok)
    (small_tok / "tiktoken.model").unlink()
    (small_tok / "tiktoken.model").symlink_to("/dev/zero")
    with pytest.raises(TokenizerError, match="tiktoken.model: not a regular file"):
        Tokenizer.from_pretrained(small_tok)


def test_load_tokenizer_without_tiktoken_model(small_tok, tmp_path_factory):
    assert load_tokenizer(small_tok).n_ordinary == 2048
    (small_tok / "tiktoken.model").unlink()
    with pytest.raises(TokenizerError, match="tiktoken.model not found, but the folder has tokenizer_config.json"):
        load_tokenizer(small_tok)
    (small_tok / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="Hugging Face fast tokenizer"):
        load_tokenizer(small_tok)
    assert load_tokenizer(tmp_path_factory.mktemp("no-tokenizer")) is None      # token ids only: fine
