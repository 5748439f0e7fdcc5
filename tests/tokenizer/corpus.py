"""Varied generated text for tokenizer tests: scripts, code, emoji, digits, odd whitespace."""

import random

WORDS = ["the", "The", "Hello", "world", "don't", "I'LL", "it's", "We've", "tokenizer", "MLX",
         "Qwen", "naïve", "café", "résumé", "über", "straße", "ﬁne", "x", "a", "OK", "HTTP",
         "camelCase", "snake_case", "kebab-case", "e.g.", "U.S.A.", "'s", "'re", "'d"]
SCRIPTS = ["你好，世界！", "我们今天去公园散步。", "模型推理速度很快", "日本語のテキストです",
           "カタカナ", "한국어 문장입니다", "Привет, мир", "Γειά σου κόσμε", "مرحبا بالعالم",
           "नमस्ते दुनिया", "สวัสดีครับ", "שלום עולם", "Tiếng Việt có dấu", "ÅÄÖ åäö"]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        '{"a": [1, 2, 3], "b": null}', "<div class=\"x\">&amp;</div>", "SELECT * FROM t;",
        "x = y if z else w  # comment", "```python\nprint('hi')\n```", "a->b::c<T>()",
        "$HOME/.cache && ls -la | grep '*.py'", "λx.x", "1e-5 + 0x1F - 0b101"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🚀✨", "🤖", "🧑🏿‍💻", "☕", "🀄"]
DIGITS = ["0", "42", "1234567890", "3.14159", "1,000,000", "2024-06-01", "007", "٣٤٥", "½"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \r\n ", "\r\n\r\n", "\u00a0", "\u3000",
          "    \n", " \t \n"]
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>"]
COMBINING = ["e\u0301", "a\u0308", "\u1100\u1161", "n\u0303", "Å", "\u212b", "ｶﾞ"]


def random_unicode(rng, n):
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.4:
            c = rng.randrange(0x20, 0x250)
        elif r < 0.8:
            c = rng.randrange(0x250, 0x10000)
        else:
            c = rng.randrange(0x10000, 0x10FFFF)
        if 0xD800 <= c <= 0xDFFF:
            continue
        out.append(chr(c))
    return "".join(out)


def texts(n, seed=0, special=False):
    """n strings mixing the pools above; `special` also splices in special-token text."""
    rng = random.Random(seed)
    pools = [WORDS, SCRIPTS, CODE, EMOJI, DIGITS, SPACES, COMBINING] + ([SPECIAL] if special else [])
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.08:
                parts.append(random_unicode(rng, rng.randint(1, 8)))
            else:
                parts.append(rng.choice(rng.choice(pools)))
            parts.append(rng.choice(["", " ", " ", "", "\n", ", "]))
        s = "".join(parts)
        if rng.random() < 0.15:
            s += " " * rng.randint(1, 3)  # trailing spaces
        if rng.random() < 0.1:
            s = " " + s
        out.append(s)
    return out
