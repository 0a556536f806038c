"""Learned tokens (textual inversion, Gal et al., 2023): a new word whose embedding row is the only thing trained.

For each concept with an ``initializer_token``, its identifier (e.g. ``<new1>``) is added to every tokenizer and
its embedding row starts as a copy of the initializer word's row:

    e_new <- e_init;    train e_new only;    every other row of E stays bitwise equal to the base model's.

The new rows live in their own parameter (``NewTokenEmbedding.new``) next to the frozen table, so the other rows
get no gradient, no optimizer state and no weight decay by construction. The official textual-inversion and
Custom Diffusion scripts instead train the whole table and zero (or restore) the other rows after each step; the
result is the same, at the cost of optimizer state for ~49k rows.

Saved in the form diffusers' ``pipe.load_textual_inversion`` reads: one ``{token: vector}`` file per token for
SD 1.x/2.x, and ``{"clip_l": ..., "clip_g": ...}`` for SDXL's two encoders (load each with its ``text_encoder`` /
``tokenizer``, as diffusers documents for SDXL embeddings).
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from ..atomic import write_bytes_atomic
from ..errors import ConfigError, ModelLoadError

SDXL_KEYS = ("clip_l", "clip_g")


class NewTokenEmbedding(torch.nn.Module):
    """A frozen token table plus trainable rows appended after it (ids ``>= len(table)`` read the new rows)."""

    def __init__(self, table: torch.nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.table = table
        self.new = torch.nn.Parameter(new_rows.detach().clone().float())

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects the table (dtype, device, shape)
        return torch.cat([self.table.weight, self.new.to(self.table.weight.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = self.table.num_embeddings
        is_new = input_ids >= n
        out = self.table(input_ids.clamp(max=n - 1))
        if not bool(is_new.any()):
            return out
        new = F.embedding((input_ids - n).clamp(min=0), self.new).to(out.dtype)
        return torch.where(is_new[..., None], new, out)

    def folded(self) -> torch.nn.Embedding:
        """A plain ``nn.Embedding`` holding all rows (what a saved pipeline contains)."""
        table = self.table.weight
        out = torch.nn.Embedding(self.num_embeddings, self.embedding_dim, device=table.device, dtype=table.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat([table, self.new.to(table.dtype)]))
        return out


def _single_token_id(tokenizer, word: str, concept: str) -> int:
    """The id of ``word`` as one token; failing that, of the raw vocabulary piece ``word``.

    The official Custom Diffusion / ClassDiffusion scripts look the initializer up as a raw piece (transformers 4's
    ``encode([word])``): their default 'ktn', two tokens as a word ('k', 'tn</w>'), is the mid-word piece 'ktn'.
    Accepting the piece reproduces their initialisation.
    """
    ids = tokenizer(word, add_special_tokens=False).input_ids
    piece = tokenizer.convert_tokens_to_ids(word)
    if len(ids) != 1 and piece is not None and piece != tokenizer.unk_token_id:
        return piece
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"concepts[{concept}].initializer_token {word!r} is {len(ids)} tokens ({pieces}) for the CLIP "
                          "tokenizer; use a word that is a single token, e.g. the class noun ('dog') or a rare one ('sks')")
    return ids[0]


class LearnedTokens:
    """The learned identifiers of a run: added to the tokenizers/encoders, trained, saved and loaded back."""

    def __init__(self, concepts):
        self.specs = [(c.identifier, c.initializer_token) for c in concepts if c.initializer_token]

    def __bool__(self) -> bool:
        return bool(self.specs)

    @property
    def tokens(self) -> list[str]:
        return [token for token, _ in self.specs]

    def check(self, components) -> None:
        """Refuse, without changing the tokenizers, identifiers that cannot become new tokens and initializer words
        that are not one token (cheap: runs before class images are generated)."""
        for tokenizer in components.tunable_tokenizers:
            for token, init in self.specs:
                _single_token_id(tokenizer, init, token)
                # add_tokens would accept 'sks' (the vocabulary stores 'sks</w>') and shadow the real word
                if len(tokenizer(token, add_special_tokens=False).input_ids) == 1 or token in tokenizer.get_vocab():
                    raise ConfigError(f"identifier {token!r} is already a word of the tokenizer's vocabulary, so it cannot "
                                      "be learned as a new token; use a fresh string such as '<new1>'")

    def add_to(self, components) -> None:
        """Add every token to every tokenizer and give each text encoder trainable rows for them."""
        self.check(components)
        for tokenizer, encoder in zip(components.tunable_tokenizers, components.tunable_text_encoders):
            table = encoder.get_input_embeddings()
            if isinstance(table, NewTokenEmbedding):
                raise RuntimeError("learned tokens were already added to this text encoder")
            init_ids = [_single_token_id(tokenizer, init, token) for token, init in self.specs]
            for token, _ in self.specs:
                if tokenizer.add_tokens(token) != 1:
                    raise ConfigError(f"identifier {token!r} is already a word of the tokenizer's vocabulary, so it cannot "
                                      "be learned as a new token; use a fresh string such as '<new1>'")
            new_ids = tokenizer.convert_tokens_to_ids(self.tokens)
            expected = list(range(table.num_embeddings, table.num_embeddings + len(self.specs)))
            if new_ids != expected:
                raise ModelLoadError(f"the tokenizer has {len(tokenizer) - len(self.specs)} tokens but the text encoder's "
                                     f"table has {table.num_embeddings} rows; they must match to add learned tokens")
            encoder.set_input_embeddings(NewTokenEmbedding(table, table.weight[init_ids]))
            encoder.config.vocab_size = table.num_embeddings + len(self.specs)

    @staticmethod
    def rows(encoder) -> torch.nn.Parameter:
        return encoder.get_input_embeddings().new

    def parameters(self, components) -> list[torch.nn.Parameter]:
        return [self.rows(e) for e in components.tunable_text_encoders]

    @staticmethod
    def transplant(source, target) -> None:
        """Give ``target`` (a copy of the same base text encoder) ``source``'s learned rows."""
        rows = source.get_input_embeddings().new.detach()
        table = target.get_input_embeddings()
        if isinstance(table, NewTokenEmbedding):
            with torch.no_grad():
                table.new.copy_(rows)
            return
        target.set_input_embeddings(NewTokenEmbedding(table, rows.to(table.weight.device)))
        target.config.vocab_size = table.num_embeddings + rows.shape[0]

    def without_rows(self, components):
        """Components whose text encoders are shallow copies holding only the base table (for exports that must
        match the base architecture, such as single-file checkpoints)."""
        from dataclasses import replace

        if not self:
            return components
        swapped = {}
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(components, name)
            if encoder is not None and isinstance(encoder.get_input_embeddings(), NewTokenEmbedding):
                path = next(n for n, m in encoder.named_modules() if isinstance(m, NewTokenEmbedding)).split(".")
                swapped[name] = _with_child(encoder, path, encoder.get_input_embeddings().table)
        return replace(components, **swapped)

    @contextlib.contextmanager
    def folded(self, components):
        """Plain embedding tables in the text encoders while a full pipeline is saved."""
        swapped = []
        for encoder in components.text_encoders:
            module = encoder.get_input_embeddings()
            if isinstance(module, NewTokenEmbedding):
                encoder.set_input_embeddings(module.folded())
                swapped.append((encoder, module))
        try:
            yield
        finally:
            for encoder, module in swapped:
                encoder.set_input_embeddings(module)

    # ------------------------------------------------------------------ artifacts

    def save(self, components, out_dir: Path, dtype: torch.dtype) -> list[dict]:
        """One diffusers-loadable file per token; returns their descriptions for personalization.json."""
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for i, token in enumerate(self.tokens):
            rows = [self.rows(e)[i].detach().to("cpu", dtype).contiguous() for e in components.tunable_text_encoders]
            state = {token: rows[0]} if len(rows) == 1 else dict(zip(SDXL_KEYS, (r[None] for r in rows)))
            name = f"learned_embeds-{i}-{_file_safe(token)}.safetensors"
            write_bytes_atomic(out_dir / name, save(state, metadata={"format": "pt", "token": token}))
            written.append({"token": token, "path": name})
        return written

    @staticmethod
    def load(pipeline, folder: Path, entries: list[dict]) -> None:
        """Add saved tokens to a pipeline through diffusers' own ``load_textual_inversion``."""
        from ..families import family_of_pipeline

        names = family_of_pipeline(pipeline).tunable_text_encoders
        for entry in entries:
            path = folder / entry["path"]
            if len(names) == 1 and hasattr(pipeline, "load_textual_inversion"):
                pipeline.load_textual_inversion(str(path), token=entry["token"], text_encoder=pipeline.text_encoder,
                                                tokenizer=pipeline.tokenizer)
                continue
            state = load_file(str(path))
            vectors = [state[entry["token"]]] if len(names) == 1 else [state[key] for key in SDXL_KEYS]
            for name, vector in zip(names, vectors):
                encoder, tokenizer = getattr(pipeline, name), getattr(pipeline, name.replace("text_encoder", "tokenizer"))
                if hasattr(pipeline, "load_textual_inversion"):
                    pipeline.load_textual_inversion(vector, token=entry["token"], text_encoder=encoder, tokenizer=tokenizer)
                else:  # SD3's pipeline has no textual-inversion loader: the same steps by hand
                    _append_token(encoder, tokenizer, entry["token"], vector.reshape(-1))


def _append_token(encoder, tokenizer, token: str, vector: torch.Tensor) -> None:
    if tokenizer.add_tokens(token) != 1:
        raise ModelLoadError(f"cannot add learned token {token!r}: the tokenizer already has it")
    encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = vector.to(
            encoder.get_input_embeddings().weight)


def _with_child(module: torch.nn.Module, path: list[str], child: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``module`` (sharing every tensor) whose submodule at ``path`` is ``child``."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # its own child table, so replacing a child leaves ``module`` intact
    head = path[0]
    setattr(clone, head, child if len(path) == 1 else _with_child(getattr(module, head), path[1:], child))
    return clone


def _file_safe(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "", token) or "token"
