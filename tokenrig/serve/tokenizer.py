"""A deterministic word-level tokenizer built locally, sized to a model's vocabulary.

No tokenizer can be downloaded here, so tokenrig builds one: every whitespace-separated word is
exactly one token. That makes synthetic prompts of an exact token length trivial to write and
lets clients count output tokens exactly from the streamed text.
"""

from __future__ import annotations

import itertools
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# Words the chat template needs as single tokens.
TEMPLATE_WORDS = ["system:", "user:", "assistant:"]
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def vocabulary(vocab_size: int, seed: int = 0) -> list[str]:
    """Specials, template words, then distinct pseudo-words, `vocab_size` entries in all."""
    words = SPECIAL_TOKENS + TEMPLATE_WORDS
    rng = random.Random(seed)
    seen = set(words)
    for length in itertools.count(2):
        candidates = ["".join(p) for p in itertools.product(_SYLLABLES, repeat=length)] if length <= 2 else None
        if candidates is None:
            while len(words) < vocab_size:
                word = "".join(rng.choice(_SYLLABLES) for _ in range(length))
                if word not in seen:
                    seen.add(word)
                    words.append(word)
            break
        rng.shuffle(candidates)
        for word in candidates:
            if len(words) >= vocab_size:
                break
            seen.add(word)
            words.append(word)
        if len(words) >= vocab_size:
            break
    return words[:vocab_size]


def build_tokenizer(vocab_size: int) -> Tokenizer:
    vocab = {word: index for index, word in enumerate(vocabulary(vocab_size))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def content_words(tokenizer: Tokenizer) -> list[str]:
    """Vocabulary entries usable as prompt text (no specials, no template words)."""
    reserved = set(SPECIAL_TOKENS + TEMPLATE_WORDS)
    vocab = tokenizer.get_vocab()
    return [word for word, _ in sorted(vocab.items(), key=lambda item: item[1]) if word not in reserved]
