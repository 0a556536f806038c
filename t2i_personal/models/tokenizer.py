"""CLIP tokenizer built offline from the BPE vocabulary that ships inside open_clip.

Every Stable Diffusion text encoder (SD 1.x, SD 2.x, both SDXL encoders) uses the same 49,408-token CLIP
vocabulary. open_clip bundles its merge list (``bpe_simple_vocab_16e6.txt.gz``), so we can write the
``vocab.json`` / ``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads without touching the hub.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from ..atomic import write_text_atomic
from ..errors import ConfigError

NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe_vocab_path() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing at {path}; reinstall open-clip-torch.")
    return path


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves (listed first), the rest to code
    # points from 256 up, so every byte sequence is representable without whitespace or control characters.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _clip_merges() -> list[str]:
    lines = gzip.open(_bpe_vocab_path()).read().decode("utf-8").split("\n")
    return lines[1 : NUM_MERGES + 1]


def _merges_applied(word: str, rank: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one lower-case word, in order (the loop of CLIP's own tokenizer,
    open_clip's ``SimpleTokenizer.bpe``: merge the lowest-ranked adjacent pair until none is a merge)."""
    parts = [*word[:-1], word[-1] + "</w>"]
    applied = []
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: rank.get(p, len(rank)))
        if pair not in rank:
            break
        applied.append(pair)
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return applied


def clip_words(texts) -> set[str]:
    """The words CLIP's pre-tokenizer makes of ASCII ``texts`` (lower case; its contractions, runs of letters,
    single digits, runs of other marks)."""
    import re

    pattern = r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"
    return {w for text in texts for w in re.findall(pattern, text.lower())}


def write_clip_tokenizer_files(out_dir: str | os.PathLike, words=None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for the standard CLIP tokenizer into ``out_dir``.

    With ``words`` (ASCII), only the merges CLIP applies to them are kept: every word is still split exactly as
    the full CLIP tokenizer splits it, any other text still tokenizes (into smaller pieces, down to single bytes),
    and the vocabulary shrinks from 49,408 tokens to a few hundred beyond the 512 byte symbols (the toy world's
    text encoders are small). Ids keep CLIP's order: bytes, bytes + ``</w>``, merges, then BOS and EOS last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = _clip_merges()
    if words is not None:
        rank = {tuple(m.split()): i for i, m in enumerate(merges)}
        kept = {pair for word in sorted(words) for pair in _merges_applied(word, rank)}
        merges = [m for m in merges if tuple(m.split()) in kept]
    symbols = list(_byte_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    files = {
        "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
    }
    for name, text in files.items():
        write_text_atomic(out_dir / name, text)
    return out_dir


def _cache_dir() -> Path:
    root = os.environ.get("T2I_PERSONAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "t2i-personal")
    return Path(root) / "clip-tokenizer"


@lru_cache(maxsize=1)
def _tokenizer_files() -> Path:
    folder = _cache_dir()
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        write_clip_tokenizer_files(folder)
    return folder


def build_clip_tokenizer(max_length: int = 77, pad_token: str = EOS) -> CLIPTokenizer:
    """The real CLIP tokenizer (SD 1.x pads with EOS; SDXL's second tokenizer pads with ``"!"``)."""
    folder = _tokenizer_files()
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=max_length,
        pad_token=pad_token,
    )


def check_prompt_length(text: str, tokenizers, where: str = "prompt", model: str = "", limit: int | None = None) -> None:
    """Refuse ``text`` when it is longer than a text encoder's window (``tokenizers``: the model's; ``None``
    entries are skipped; ``limit``: a window other than the tokenizer's own, e.g. T5's max_sequence_length):
    diffusers would cut it silently, and the image would ignore the words past the cut."""
    window = limit
    for tokenizer in tokenizers:
        if tokenizer is None:
            continue
        limit = window or tokenizer.model_max_length
        n = len(tokenizer(text, truncation=False).input_ids)
        if n > limit:
            of = f" of {model}" if model else ""
            raise ConfigError(f"{where}: {text!r} is {n} tokens long; the text encoder{of} reads at most {limit} "
                              "(start and end tokens included). Shorten the prompt or caption.")


def check_pipeline_prompt(text: str, pipe, where: str = "prompt", model: str = "") -> None:
    """:func:`check_prompt_length` against every window of a loaded pipeline, as its model family defines them."""
    from ..errors import ModelLoadError
    from ..families import family_of_pipeline

    try:
        windows = family_of_pipeline(pipe).prompt_windows(pipe)
    except ModelLoadError:  # a pipeline-like object of no family: its tokenizers' own windows
        tokenizers = (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
        windows = [(t, t.model_max_length) for t in tokenizers if t is not None]
    for tokenizer, limit in windows:
        check_prompt_length(text, [tokenizer], where, model, limit=limit)
