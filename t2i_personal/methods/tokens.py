"""Learned tokens (textual inversion, Gal et al., 2023): a new word whose embedding row is the only thing trained.

For each concept with an ``initializer_token``, its identifier (e.g. ``<new1>``) is added to every tokenizer and
its embedding row starts as a copy of the initializer word's row:

    e_new <- e_init;    train e_new only;    every other row of E stays bitwise equal to the base model's.

The new rows live in their own parameter (``NewTokenEmbedding.new``) next to the frozen table, so the other rows
get no gradient, no optimizer state and no weight decay by construction. The official textual-inversion and
Custom Diffusion scripts instead train the whole table and zero (or restore) the other rows after each step; the
result is the same, at the cost of optimizer state for ~49k rows.

Saved in the form diffusers' ``pipe.load_textual_inversion`` reads: one ``{token: vector}`` file per token for
one encoder (SD 1.x/2.x, FLUX's CLIP), and ``{"clip_l": ..., "clip_g": ..., "t5": ...}`` for several (SDXL, SD3;
FLUX with ``training.learn_tokens_in_t5``, as diffusers' advanced FLUX script saves CLIP + T5 embeddings): load each
with its ``text_encoder`` / ``tokenizer``, as diffusers documents for SDXL embeddings.
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



class NewTokenEmbedding(torch.nn.Module):
    """A frozen token table plus trainable rows after its vocabulary: ids ``>= first_id`` read the new rows.

    ``first_id`` is the tokenizer's size: the table's own length for CLIP; T5's table has padding rows past its
    32,100 ids (32,128 rows), which the new tokens take the place of, as ``resize_token_embeddings(len(tokenizer))``
    does in diffusers' textual-inversion loader."""

    def __init__(self, table: torch.nn.Embedding, new_rows: torch.Tensor, first_id: int | None = None):
        super().__init__()
        self.table = table
        self.first_id = table.num_embeddings if first_id is None else first_id
        self.new = torch.nn.Parameter(new_rows.detach().clone().float())

    @property
    def num_embeddings(self) -> int:
        return self.first_id + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects the table (dtype, device, shape)
        return torch.cat([self.table.weight[: self.first_id], self.new.to(self.table.weight.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = self.first_id
        is_new = input_ids >= n
        out = self.table(input_ids.clamp(max=n - 1))
        if not bool(is_new.any()):
            return out
        new = F.embedding((input_ids - n).clamp(min=0), self.new).to(out.dtype)
        return torch.where(is_new[..., None], new, out)

    def folded(self) -> torch.nn.Embedding:
        """A plain ``nn.Embedding`` holding the vocabulary's rows and the new ones (what a saved pipeline contains)."""
        table = self.table.weight
        out = torch.nn.Embedding(self.num_embeddings, self.embedding_dim, device=table.device, dtype=table.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
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
        for tokenizer in components.tokenizers_of(components.token_text_encoder_names):
            for token, init in self.specs:
                _single_token_id(tokenizer, init, token)
                # add_tokens would accept 'sks' (the vocabulary stores 'sks</w>') and shadow the real word
                if len(tokenizer(token, add_special_tokens=False).input_ids) == 1 or token in tokenizer.get_vocab():
                    raise ConfigError(f"identifier {token!r} is already a word of the tokenizer's vocabulary, so it cannot "
                                      "be learned as a new token; use a fresh string such as '<new1>'")

    def add_to(self, components) -> None:
        """Add every token to every tokenizer and give each text encoder trainable rows for them."""
        self.check(components)
        names = components.token_text_encoder_names
        for tokenizer, encoder in zip(components.tokenizers_of(names), [getattr(components, n) for n in names]):
            table = encoder.get_input_embeddings()
            if isinstance(table, NewTokenEmbedding):
                raise RuntimeError("learned tokens were already added to this text encoder")
            init_ids = [_single_token_id(tokenizer, init, token) for token, init in self.specs]
            first_id = len(tokenizer)  # T5: below its table's padding rows
            if first_id > table.num_embeddings:
                raise ModelLoadError(f"the tokenizer has {first_id} tokens but the text encoder's table has "
                                     f"{table.num_embeddings} rows; the tokenizer does not belong to this encoder")
            for token, _ in self.specs:
                if tokenizer.add_tokens(token) != 1:
                    raise ConfigError(f"identifier {token!r} is already a word of the tokenizer's vocabulary, so it cannot "
                                      "be learned as a new token; use a fresh string such as '<new1>'")
            if tokenizer.convert_tokens_to_ids(self.tokens) != list(range(first_id, first_id + len(self.specs))):
                raise ModelLoadError("the tokenizer gave the learned tokens unexpected ids; its added tokens must follow "
                                     "its vocabulary")
            encoder.set_input_embeddings(NewTokenEmbedding(table, table.weight[init_ids], first_id))
            encoder.config.vocab_size = first_id + len(self.specs)

    @staticmethod
    def rows(encoder) -> torch.nn.Parameter:
        return encoder.get_input_embeddings().new

    def parameters(self, components) -> list[torch.nn.Parameter]:
        return [self.rows(getattr(components, n)) for n in components.token_text_encoder_names]

    @staticmethod
    def transplant(source, target) -> None:
        """Give ``target`` (a copy of the same base text encoder) ``source``'s learned rows."""
        learned = source.get_input_embeddings()
        rows = learned.new.detach()
        table = target.get_input_embeddings()
        if isinstance(table, NewTokenEmbedding):
            with torch.no_grad():
                table.new.copy_(rows)
            return
        target.set_input_embeddings(NewTokenEmbedding(table, rows.to(table.weight.device), learned.first_id))
        target.config.vocab_size = learned.first_id + rows.shape[0]

    def without_rows(self, components):
        """Components whose text encoders are shallow copies holding only the base table (for exports that must
        match the base architecture, such as single-file checkpoints)."""
        from dataclasses import replace

        if not self:
            return components
        swapped = {}
        for name in components.text_encoder_names:
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
            names = components.token_text_encoder_names
            rows = [self.rows(getattr(components, n))[i].detach().to("cpu", dtype).contiguous() for n in names]
            keys = [components.family.token_file_keys[n] for n in names]
            state = {token: rows[0]} if len(rows) == 1 else dict(zip(keys, (r[None] for r in rows)))
            name = f"learned_embeds-{i}-{_file_safe(token)}.safetensors"
            write_bytes_atomic(out_dir / name, save(state, metadata={"format": "pt", "token": token}))
            written.append({"token": token, "path": name})
        return written

    @staticmethod
    def load(pipeline, folder: Path, entries: list[dict]) -> None:
        """Add saved tokens to a pipeline through diffusers' own ``load_textual_inversion``."""
        from ..families import family_of_pipeline
        from ..families.base import tokenizer_name

        family = family_of_pipeline(pipeline)
        for entry in entries:
            path = folder / entry["path"]
            state = load_file(str(path))
            if entry["token"] in state and hasattr(pipeline, "load_textual_inversion"):  # one encoder: the CLIP
                pipeline.load_textual_inversion(str(path), token=entry["token"], text_encoder=pipeline.text_encoder,
                                                tokenizer=pipeline.tokenizer)
                continue
            if entry["token"] in state:
                vectors = {"text_encoder": state[entry["token"]]}
            else:  # several encoders, keyed as diffusers' SDXL / advanced FLUX scripts save them (clip_l, clip_g, t5)
                vectors = {n: state[k] for n, k in family.token_file_keys.items() if k in state}
            for name, vector in vectors.items():
                encoder, tokenizer = getattr(pipeline, name), getattr(pipeline, tokenizer_name(name))
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
