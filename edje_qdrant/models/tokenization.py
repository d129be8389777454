"""Pair tokenizer of the joint encoder: ``[CLS] caption [SEP] <image>×m [SEP]`` exactly as the official EDJE code.

Built directly on the ``tokenizers`` library with the BERT uncased pipeline (the same pieces the HF fast BERT
tokenizer uses), so the result does not depend on the transformers major version. The official layout is the
sentence pair ``(caption, "<image>" * m)`` with truncation ``only_first`` to ``max_text_tokens + m`` and right
padding. Special/added tokens (``[CLS]``, ``[SEP]``, ``[MASK]``, ``[PAD]``, ``[UNK]``, ``<image>``) are matched in the
raw text, as in the official tokenizer.

Deliberate difference: a caption holding the literal text ``<image>`` would give an extra image-token position,
which makes the official code fail for the whole batch. Here the literal text is escaped to ``<IMAGE>`` in the
caption segment only: the added token is case-sensitive, so it is then read as the plain text ``<``, ``image``,
``>`` (what an upper-case ``<IMAGE>`` always gives after lower-casing). Captions the official code accepts
tokenize identically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from edje_qdrant.errors import InputError, ModelError

IMAGE_TOKEN = "<image>"
_ESCAPED_IMAGE_TOKEN = "<IMAGE>"
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def default_vocab_path() -> Path:
    """The bundled bert-base-uncased WordPiece vocabulary (30522 lines)."""
    return Path(__file__).resolve().parent.parent / "assets" / "bert-uncased-vocab.txt"


@dataclass(frozen=True)
class PairEncoding:
    """Token tensors of a batch of pairs, int64 ``[B, L]`` each (L = longest real sequence)."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> "PairEncoding":
        return PairEncoding(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.token_type_ids, self.attention_mask)))

    def expand(self, n: int) -> "PairEncoding":
        """Broadcast a one-row encoding to ``n`` rows without copying."""
        if self.input_ids.shape[0] != 1:
            raise InputError(f"expand() needs a one-row encoding, got {self.input_ids.shape[0]} rows")
        return PairEncoding(*(t.expand(n, -1) for t in (
            self.input_ids, self.token_type_ids, self.attention_mask)))


def _resolve_vocab(source: str | Path | None) -> tuple[Path, bool]:
    """Vocab file path and lower-casing flag from a vocab file, a tokenizer directory or None (bundled)."""
    if source is None:
        return default_vocab_path(), True
    path = Path(source)
    lower = True
    if path.is_dir():
        cfg = path / "tokenizer_config.json"
        if cfg.is_file():
            try:
                lower = bool(json.loads(cfg.read_text(encoding="utf-8")).get("do_lower_case", True))
            except (OSError, ValueError) as exc:
                raise ModelError(f"{cfg}: unreadable tokenizer config ({exc}); fix or remove it") from exc
        path = path / "vocab.txt"
    if not path.is_file():
        raise ModelError(f"tokenizer vocabulary not found at {path}: pass a WordPiece vocab.txt file or a "
                         "directory holding one (default: the bundled BERT uncased vocab)")
    return path, lower


class PairTokenizer:
    """BERT uncased WordPiece + the special ``<image>`` token, encoding (caption, ``<image>``×m) pairs."""

    def __init__(self, num_tokens: int, vocab: str | Path | None = None, max_text_tokens: int = 64,
                 image_token_id: int | None = None) -> None:
        if num_tokens < 1:
            raise InputError(f"num_tokens must be >= 1, got {num_tokens}")
        vocab_path, lower = _resolve_vocab(vocab)
        try:
            tk = Tokenizer(WordPiece.from_file(str(vocab_path), unk_token="[UNK]"))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ModelError(f"{vocab_path}: not a WordPiece vocabulary ({exc})") from exc
        tk.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        ids = {s: tk.token_to_id(s) for s in _SPECIALS}
        if any(v is None for v in ids.values()):
            raise ModelError(f"{vocab_path}: vocabulary lacks special tokens "
                             f"{[s for s, v in ids.items() if v is None]}")
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0",
            pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
        )
        tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (*_SPECIALS, IMAGE_TOKEN)])
        self.image_token_id = int(tk.token_to_id(IMAGE_TOKEN))
        if image_token_id is not None and image_token_id != self.image_token_id:
            raise ModelError(f"{vocab_path}: <image> got id {self.image_token_id}, the model expects "
                             f"{image_token_id}; use the vocabulary the model was trained with")
        self.pad_token_id = int(ids["[PAD]"])
        self.num_tokens = int(num_tokens)
        self.max_text_tokens = int(max_text_tokens)
        self.max_length = self.max_text_tokens + self.num_tokens
        self.vocab_size = int(tk.get_vocab_size(with_added_tokens=True))
        self.vocab_path = vocab_path
        tk.enable_truncation(self.max_length, strategy="only_first")
        tk.enable_padding(direction="right", pad_id=self.pad_token_id, pad_type_id=0, pad_token="[PAD]")
        self._tk = tk  # configured once; encode calls never mutate it (safe across threads)
        self._image_segment = IMAGE_TOKEN * self.num_tokens

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (read-only use)."""
        return self._tk

    @staticmethod
    def escape(caption: str) -> str:
        """Make a literal ``<image>`` in a caption plain text (see module docstring)."""
        return caption.replace(IMAGE_TOKEN, _ESCAPED_IMAGE_TOKEN) if IMAGE_TOKEN in caption else caption

    def encode(self, captions: str | list[str]) -> PairEncoding:
        """Captions -> padded pair encoding ``[B, L]`` (one row for a single string)."""
        if isinstance(captions, str):
            captions = [captions]
        if not captions:
            raise InputError("encode() needs at least one caption")
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise InputError(f"caption {i} is {type(c).__name__}, expected str")
        encs = self._tk.encode_batch([(self.escape(c), self._image_segment) for c in captions])
        return PairEncoding(
            torch.tensor([e.ids for e in encs], dtype=torch.long),
            torch.tensor([e.type_ids for e in encs], dtype=torch.long),
            torch.tensor([e.attention_mask for e in encs], dtype=torch.long),
        )

    def tokenize(self, caption: str) -> list[str]:
        """Token strings of one caption's pair layout (for inspection and tests)."""
        return self._tk.encode(self.escape(caption), self._image_segment).tokens


def bert_text_tokenizer(vocab: str | Path | None = None, max_length: int = 64) -> Tokenizer:
    """Plain BERT uncased ``[CLS] text [SEP]`` tokenizer (no ``<image>``), truncating and padding to the longest."""
    vocab_path, lower = _resolve_vocab(vocab)
    tk = Tokenizer(WordPiece.from_file(str(vocab_path), unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id, pad_id = (tk.token_to_id(s) for s in ("[CLS]", "[SEP]", "[PAD]"))
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    tk.enable_truncation(max_length)
    tk.enable_padding(direction="right", pad_id=pad_id, pad_token="[PAD]")
    return tk
