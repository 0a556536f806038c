"""A small T5-style tokenizer built offline, for the built-in tiny SD3 / FLUX models.

Real T5 vocabularies (SentencePiece, 32k pieces) come from the hub, which this toolkit cannot assume. The tiny
models only need *a* deterministic tokenizer with T5's conventions (``<pad>`` = 0, ``</s>`` = 1 appended to every
sequence, ``<unk>`` = 2, no BOS), so one is trained here with the ``tokenizers`` library (a Unigram model, as
SentencePiece's) on the words of the package's own prompt sets. Every ASCII character is in its alphabet, so any
prompt tokenizes; a real model's own tokenizer is always used as it ships.
"""

from __future__ import annotations

import string
from functools import lru_cache
from importlib import resources

from transformers import T5TokenizerFast

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
VOCAB_SIZE = 1000


def _corpus() -> list[str]:
    folder = resources.files("t2i_personal.data") / "prompt_sets"
    lines = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.endswith((".yaml", ".txt")):
            lines += [line.strip(" -'\"") for line in path.read_text().splitlines() if line.strip()]
    return lines + ["a photo of a dog", "a photo of a cat", "a painting in the style of", string.ascii_letters]


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, unk_token="<unk>",
                                      initial_alphabet=list(string.printable.strip()), show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", eos)])
    return tokenizer.to_str()


def build_word_t5_tokenizer(corpus, model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 Unigram tokenizer whose pieces are the words of ``corpus`` (lower-cased, scored by frequency) and every
    printable character, alone and word-initial: each corpus word is one token and any other text still tokenizes.
    It is what SentencePiece gives when the vocabulary is larger than the corpus' words, written out directly
    because the Unigram *trainer* prunes a small, repetitive corpus down to letter pieces. Built through
    ``T5Tokenizer(vocab=...)``, which is also how ``from_pretrained`` rebuilds it, so a saved copy tokenizes
    exactly alike; case-sensitive, as T5's own ("Dog" is not "dog")."""
    import math
    import re
    from collections import Counter

    counts = Counter(word for text in corpus for word in re.findall(r"[a-z0-9]+", text.lower()))
    total = sum(counts.values())
    char_score = math.log(0.5 / total) - 1  # below the rarest word, so a known word is never spelled out
    chars = list(string.printable.strip())
    pieces = {token: 0.0 for token in SPECIAL_TOKENS}
    pieces.update({"▁" + word: math.log(n / total) for word, n in sorted(counts.items())})
    for piece in ["▁", *chars, *("▁" + c for c in chars)]:
        pieces.setdefault(piece, char_score)
    return T5TokenizerFast(vocab=list(pieces.items()), eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)


def build_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """The offline T5-style tokenizer (same ids on every machine: the training is deterministic)."""
    from tokenizers import Tokenizer

    return T5TokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="</s>",
                           pad_token="<pad>", unk_token="<unk>", extra_ids=0, model_max_length=model_max_length)
