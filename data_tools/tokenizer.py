"""Train a WordPiece vocabulary on the captions in tar shards (ALIGN trained its own vocab).

The result is saved with ``save_pretrained`` so ``AutoTokenizer.from_pretrained(dir,
local_files_only=True)`` loads it offline, with [PAD]=0 and [CLS] ... [SEP] added on encode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

from dualenc.fileio import staged_directory
from dualenc.progress import progress

# Shard specs are resolved by dualenc.data.sources.expand_urls (via shards.expand_shards, which
# adds the data tools' strictness); re-exported here for existing callers.
from .shards import expand_shards, iter_tar_samples

__all__ = ["SPECIAL_TOKENS", "expand_shards", "iter_captions", "train_wordpiece"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # order fixes the ids: [PAD] = 0


def iter_captions(shards: str | os.PathLike | list[str]) -> Iterator[str]:
    """Yield the ``.txt`` captions of the given shards, in shard order, through the one shard
    reader (other members are never read); non-UTF-8 and empty ones are skipped."""
    for path in progress(expand_shards(shards), desc="tokenizer: reading captions", unit="shard"):
        for sample in iter_tar_samples([path], wanted=lambda name: name.endswith(".txt")):
            caption, _ = sample.caption()
            if caption:
                yield caption


def train_wordpiece(
    captions: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 1000,
    lowercase: bool = True,
    min_frequency: int = 2,
    model_max_length: int = 77,
    overwrite: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on ``captions`` and save it to ``out_dir``.

    Written to a temporary sibling directory and renamed into place, so ``out_dir`` is either
    the complete tokenizer or untouched.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small; use at least a few hundred")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) or choose another directory")

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix="##",
        show_progress=False,
    )

    n = 0

    def counted() -> Iterator[str]:
        nonlocal n
        for text in captions:
            n += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if n == 0:
        raise ValueError("no captions to train on; check that the shards contain .txt members")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )

    hf = BertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=lowercase,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )

    with staged_directory(out) as tmp:  # an interrupted save never leaves a half-written tokenizer
        hf.save_pretrained(tmp)
    return hf
