"""Step 1: train a byte-level BPE tokenizer on a corpus and save it for `transformers`.

The tokenizer follows roberta-base's conventions: special tokens `<s>`, `<pad>`, `</s>`, `<unk>`,
`<mask>` get ids 0-4, the 256 byte symbols are always in the vocabulary (so any text encodes
and decodes back exactly), no prefix space is added, and `<mask>` absorbs the space before it
(so `"is <mask>."` masks the word token " Paris" the way MLM training does).

Encoding adds no special tokens around the text (like GPT-2's tokenizer): decode(encode(text))
is the text itself, and the data pipeline decides where `<s>`/`</s>` go.

    flax-lm train-tokenizer --train_file 'corpus/**/*.txt' --vocab_size 50265 --output_dir tok/
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, ByteLevelBPETokenizer

from flax_lm.errors import UserError

SPECIAL_TOKENS = {  # role -> token; list order gives ids 0..4, as in roberta-base
    "bos_token": "<s>",
    "pad_token": "<pad>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)


def special_tokens() -> list[str | AddedToken]:
    """Special tokens in id order; `<mask>` strips the space to its left, like roberta-base."""
    tokens: list[str | AddedToken] = list(SPECIAL_TOKENS.values())
    tokens[-1] = AddedToken(SPECIAL_TOKENS["mask_token"], lstrip=True, special=True)
    return tokens


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"vocab_size {vocab_size} is too small: the {BYTE_ALPHABET_SIZE} byte symbols and "
            f"{len(SPECIAL_TOKENS)} special tokens need at least {MIN_VOCAB_SIZE}"
        )


def train_tokenizer(
    texts_iterator: Iterable[str] | Iterable[list[str]],
    vocab_size: int,
    min_frequency: int,
    output_dir: str | Path,
) -> Path:
    """Train byte-level BPE on texts (or batches of texts) and save it to `output_dir`.

    The iterator is consumed once, so a streaming corpus is never held in memory.
    Writes tokenizer.json and tokenizer_config.json, loadable with AutoTokenizer.
    """
    check_vocab_size(vocab_size)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=False)
    bpe.train_from_iterator(
        texts_iterator,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens(),
        show_progress=False,
    )
    return save_for_transformers(bpe, output_dir)


def save_for_transformers(bpe: ByteLevelBPETokenizer, output_dir: str | Path) -> Path:
    """Save as a `transformers` tokenizer with every special-token role set.

    tokenizer_config.json names the generic tokenizers backend as its class, so a GPT-2 or
    RoBERTa config.json saved in the same directory does not make AutoTokenizer rebuild the
    tokenizer with that model's defaults. Decoding never "cleans up" spaces: it is exact.
    """
    from transformers import PreTrainedTokenizerFast  # slow import: only when saving

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(output_dir)
    return output_dir
