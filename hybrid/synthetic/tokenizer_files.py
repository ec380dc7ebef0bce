"""Tokenizer files for synthetic test checkpoints, in the real Kimi checkpoint layout.

`write_tokenizer_files(out_dir, vocab_size)` writes `tiktoken.model` (vocab_size - 256 BPE
ranks: 256 single bytes, then merges learned on the small corpus below, pre-tokenized with the
Kimi pattern), `tokenizer_config.json` (256 added tokens named as in the real checkpoint, spec
§5.3) and `chat_template.jinja` (a template with the K2.5/K2.6 structure, docs/kimi_k2.md §5).
Exercised by tests/test_tokenizer.py and tests/test_chat.py.
"""
from __future__ import annotations

import base64
import heapq
import json
import random
from collections import Counter
from pathlib import Path

import regex

from hybrid.text.tokenizer import NUM_SPECIAL, PAT_STR, SPECIAL_NAMES

CORPUS = """\
The quick brown fox jumps over the lazy dog. It's a sunny day, isn't it? We'll see what they've
planned: a walk by the river, then lunch at noon. Running, jumping and swimming are what I'd like.
In 1492, Columbus sailed the ocean blue; in 1969, humans walked on the Moon. The population of the
city grew from 12,345 to 1,234,567 between 1900 and 2020 (an increase of 9,900%!). Prices: $3.99,
€12.50, £7 and ¥1000. Call +1 (555) 010-2345 or e-mail someone@example.com before 5:30 PM.
THE END OF THE FIRST PART. Dr. Smith said: "Never trust a NaN; always check for Infinity."
Mixed CamelCaseWords and snake_case_words and SCREAMING_SNAKE_CASE and kebab-case-words appear.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    seq = [0, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]

class Tokenizer:
    def __init__(self, ranks):
        self.ranks = dict(ranks)  # bytes -> int
        self.cache = {}

    def encode(self, text):
        if text in self.cache:
            return self.cache[text]
        ids = [self.ranks[b] for b in text.encode("utf-8")]
        self.cache[text] = ids
        return ids

for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
if (x != NULL && x->next) { return x->next->value; } else { return -1; }
const result = await fetch(`https://api.example.com/v1/items?id=${id}&limit=20`);
SELECT name, COUNT(*) AS n FROM users WHERE age >= 18 GROUP BY name ORDER BY n DESC;
{"name": "widget", "price": 19.99, "tags": ["a", "b"], "nested": {"ok": true, "n": null}}
<div class="container"><p>Hello, <b>world</b>!</p></div>
    indented with four spaces
\tindented with a tab\t\ttwo tabs
trailing spaces here    \n\n\n   multiple blank lines above

人工智能正在改变世界。我们今天去公园散步，天气非常好！这个模型可以理解中文、英文和代码。
机器学习是人工智能的一个分支，它使计算机能够从数据中学习，而不需要明确的编程。
東京は日本の首都です。ひらがなとカタカナと漢字を使います。今日はいい天気ですね。
서울은 대한민국의 수도입니다. 한국어 문장도 포함되어 있습니다.
Привет, мир! Это пример текста на русском языке. Ελληνικά γράμματα: αβγδε ΑΒΓΔΕ.
مرحبا بالعالم. שלום עולם. नमस्ते दुनिया। สวัสดีชาวโลก
Emoji: 😀😃😄😁 👍🏽 ❤️ 🎉🎉 👨‍👩‍👧‍👦 🇫🇷 🚀 ✨ — and symbols: ∑∫√∞ ≤≥≠ → ← ↑ ↓ © ® ™ § ¶ • …
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 65536 3.14159 2.71828 6.022e23 -273.15 0xFF 0b1010
Dates: 2024-01-15T12:34:56Z, 15/01/2024, Jan 15th, 2024. Versions v1.2.3, python3.11, gcc-13.
"""

# extra scripts the generated text draws from (ranges of code points)
_SCRIPTS = [(0x4E00, 0x4FFF), (0x3041, 0x3096), (0x30A1, 0x30FA), (0xAC00, 0xAD00),
            (0x0410, 0x044F), (0x03B1, 0x03C9), (0x1F600, 0x1F64F), (0x00E0, 0x00FF)]


def _generated_text(rng: random.Random, n_chars: int) -> str:
    """Deterministic text mixing words built from the corpus' letters, numbers, code-like
    identifiers and CJK / emoji runs, so there are enough pairs to learn large vocabularies."""
    words = regex.findall(r"[A-Za-z]+", CORPUS)
    letters = "".join(words).lower()
    out, total = [], 0
    while total < n_chars:
        r = rng.random()
        if r < 0.45:
            w = rng.choice(words) if rng.random() < 0.5 else \
                "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
            w = w.capitalize() if rng.random() < 0.15 else w
            s = " " + w
        elif r < 0.55:
            s = " " + str(rng.randint(0, 10 ** rng.randint(1, 7)))
        elif r < 0.65:
            s = " " + "_".join(rng.choice(words).lower() for _ in range(rng.randint(1, 3))) + "()"
        elif r < 0.85:
            lo, hi = rng.choice(_SCRIPTS)
            s = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6)))
            if rng.random() < 0.5:
                s = " " + s
        else:
            s = rng.choice([".", ",", ";", ":", "!", "?", "\n", "\n\n", " (", ")", " {", "}",
                            " =", " ==", " ->", "    ", "\t", " \"", "\"", " '"])
        out.append(s)
        total += len(s)
    return "".join(out)


def _learn_merges(n_merges: int, seed: int = 0) -> list[bytes]:
    """Byte-level BPE training (most frequent pair, ties by lower id pair) on pre-tokenized
    words; returns the new token byte strings in rank order (merges never cross pre-tokens)."""
    pat = regex.compile(PAT_STR)
    counts = Counter(pat.findall(CORPUS))
    for w in counts:
        counts[w] *= 4  # the hand-written corpus outweighs the generated text
    rng = random.Random(seed)
    if n_merges > 0:
        counts.update(pat.findall(_generated_text(rng, 12 * n_merges + 20_000)))
    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    index = {b: i for i, b in enumerate(vocab)}
    words = [list(w.encode("utf-8")) for w in counts]
    freq = list(counts.values())
    pair_count: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for wi, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_count[p] += freq[wi]
            where.setdefault(p, set()).add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[bytes] = []
    while len(merges) < n_merges and heap:
        negc, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negc or negc == 0:
            continue  # stale entry
        a, b = pair
        new_bytes = vocab[a] + vocab[b]
        new_id = index.get(new_bytes)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(new_bytes)
            index[new_bytes] = new_id
            merges.append(new_bytes)
        touched = set()
        for wi in list(where.get(pair, ())):
            w, f = words[wi], freq[wi]
            for p in zip(w, w[1:]):
                pair_count[p] -= f
                touched.add(p)
                s = where.get(p)
                if s is not None:
                    s.discard(wi)
            nw, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    nw.append(new_id)
                    i += 2
                else:
                    nw.append(w[i])
                    i += 1
            words[wi] = nw
            for p in zip(nw, nw[1:]):
                pair_count[p] += f
                touched.add(p)
                where.setdefault(p, set()).add(wi)
        for p in touched:
            c = pair_count[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
                where.pop(p, None)
    # pairs ran out: keep going with concatenations of the most frequent existing tokens
    # (each is still a merge of two lower-ranked tokens, so the file stays a valid BPE)
    if len(merges) < n_merges:
        tok_freq: Counter = Counter()
        for w, f in zip(words, freq):
            for t in w:
                tok_freq[t] += f
        top = [t for t, _ in tok_freq.most_common()]
        for a in top:
            for b in top:
                nb = vocab[a] + vocab[b]
                if nb not in index:
                    index[nb] = len(vocab)
                    vocab.append(nb)
                    merges.append(nb)
                    if len(merges) >= n_merges:
                        return merges
    return merges

# Chat template with the structure of the K2.5/K2.6 `chat_template.jinja` (docs/kimi_k2.md §5): a
# tool_declare turn (the TypeScript-style `tools_ts_str` the tokenizer computes -- hybrid/chat.py
# does it with hybrid/text/tool_declaration.py -- or, when that is empty/undefined, the compact tools
# JSON), <|im_{role}|>{name}<|im_middle|>{body}<|im_end|> turns with no newlines
# between them, `## Return of {id}` tool turns, reasoning dropped to <think></think> for history
# up to the last assistant answer without tool calls (all kept with preserve_thinking), and the
# generation prompt ending in <think> (thinking) or <think></think> (thinking=false).
# Whitespace control is explicit, so it renders the same with or without trim_blocks.
CHAT_TEMPLATE = """\
{%- macro render_content(msg) -%}
  {%- set c = msg.get('content') -%}
  {%- if c is string -%}
    {{- c -}}
  {%- elif c is not none -%}
    {%- for part in c -%}
      {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
        <|media_begin|>image<|media_content|><|media_pad|><|media_end|>
      {%- else -%}
        {{- part['text'] -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}

{%- macro open_turn(msg) -%}
  {%- set role_name = msg.get('name') or msg['role'] -%}
  {%- if msg['role'] == 'user' -%}
    <|im_user|>{{ role_name }}<|im_middle|>
  {%- elif msg['role'] == 'assistant' -%}
    <|im_assistant|>{{ role_name }}<|im_middle|>
  {%- else -%}
    <|im_system|>{{ role_name }}<|im_middle|>
  {%- endif -%}
{%- endmacro -%}

{%- macro render_tool_calls(msg) -%}
  <|tool_calls_section_begin|>
  {%- for tc in msg['tool_calls'] -%}
    <|tool_call_begin|>{{ tc['id'] }}<|tool_call_argument_begin|>
    {%- if tc['function']['arguments'] is string -%}
      {{- tc['function']['arguments'] -}}
    {%- else -%}
      {{- tc['function']['arguments'] | tojson -}}
    {%- endif -%}
    <|tool_call_end|>
  {%- endfor -%}
  <|tool_calls_section_end|>
{%- endmacro -%}

{%- macro render_message(msg, keep_reasoning) -%}
  {{- open_turn(msg) -}}
  {%- if msg['role'] == 'assistant' -%}
    {%- if keep_reasoning -%}
      <think>{{ msg.get('reasoning_content') or '' }}</think>
    {%- else -%}
      <think></think>
    {%- endif -%}
    {{- render_content(msg) -}}
    {%- if msg.get('tool_calls') -%}
      {{- render_tool_calls(msg) -}}
    {%- endif -%}
  {%- elif msg['role'] == 'tool' -%}
    {{- '## Return of ' ~ msg['tool_call_id'] ~ '\\n' -}}
    {{- render_content(msg) -}}
  {%- else -%}
    {{- render_content(msg) -}}
  {%- endif -%}
  <|im_end|>
{%- endmacro -%}

{#- history = up to the last assistant answer without tool calls: its reasoning is dropped;
    the trailing agentic segment keeps it. preserve_thinking keeps it everywhere. -#}
{%- set ns = namespace(split=-1) -%}
{%- if not (preserve_thinking is defined and preserve_thinking) -%}
  {%- for i in range(messages | length - 1, -1, -1) -%}
    {%- if ns.split < 0 and messages[i]['role'] == 'assistant' and not messages[i].get('tool_calls') -%}
      {%- set ns.split = i -%}
    {%- endif -%}
  {%- endfor -%}
{%- endif -%}
{%- set hist_msgs = messages[:ns.split + 1] -%}
{%- set suffix_msgs = messages[ns.split + 1:] -%}
{%- set drop_all = thinking is defined and thinking is false -%}

{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>
  {%- if tools_ts_str -%}
    {{- tools_ts_str -}}
  {%- else -%}
    {{- tools | tojson(separators=(',', ':')) -}}
  {%- endif -%}
  <|im_end|>
{%- endif -%}

{%- for msg in hist_msgs -%}
  {{- render_message(msg, false) -}}
{%- endfor -%}
{%- for msg in suffix_msgs -%}
  {{- render_message(msg, not drop_all) -}}
{%- endfor -%}

{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
  {%- if drop_all -%}
    <think></think>
  {%- else -%}
    <think>
  {%- endif -%}
{%- endif -%}
"""


def tokenizer_config(n_ordinary: int, chat_template: str | None = None) -> dict:
    decoder = {}
    for off in range(NUM_SPECIAL):
        tid = n_ordinary + off
        decoder[str(tid)] = {
            "content": SPECIAL_NAMES.get(off, f"<|reserved_token_{tid}|>"),
            "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
    cfg = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>",
                                      "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
                                      "<|im_system|>", "<|im_middle|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def write_tokenizer_files(out_dir: str | Path, vocab_size: int) -> None:
    """Write tiktoken.model, tokenizer_config.json and chat_template.jinja into out_dir.
    vocab_size counts the 256 special ids (real model: 163840 = 163584 + 256)."""
    n = vocab_size - NUM_SPECIAL
    if n < 256:
        raise ValueError(f"vocab_size={vocab_size} too small: need >= 512 "
                         f"(256 byte tokens + {NUM_SPECIAL} special tokens)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _learn_merges(n - 256)
    assert len(merges) == n - 256, (len(merges), n)
    tokens = [bytes([i]) for i in range(256)] + merges
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)]
    (out / "tiktoken.model").write_text("".join(lines))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(n), indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)

