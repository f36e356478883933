"""`flax-lm train-tokenizer` (and `tokenizer/train_tokenizer.py`): train a byte-level BPE
tokenizer on a corpus and save it for `transformers` (see flax_lm.tokenizer).

    flax-lm train-tokenizer --train_file 'corpus/**/*.txt' --vocab_size 50265 --output_dir tok/
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from tokenizers import Tokenizer
from tqdm.auto import tqdm

from flax_lm.corpus import Corpus, iter_text_batches, refuse_remote_code, text_dataset_from_flags
from flax_lm.errors import ArgParser, UserError, report_user_errors
from flax_lm.storage import check_output_dir
from flax_lm.tokenizer import check_vocab_size, train_tokenizer
from flax_lm.train.args import warn_about_secrets_on_the_command_line


def build_parser() -> ArgParser:
    parser = ArgParser(
        prog="flax-lm train-tokenizer",
        description="Train a ByteLevelBPE tokenizer (roberta-base special tokens) on a corpus.",
    )
    source = parser.add_argument_group("corpus (give --dataset_name or --train_file)")
    source.add_argument("--dataset_name", help="a Hugging Face hub dataset")
    source.add_argument("--dataset_config_name", help="its configuration, e.g. a language")
    source.add_argument("--dataset_revision", help="its branch, tag or commit "
                        "(refs/convert/parquet: the Hub's Parquet conversion)")
    source.add_argument("--trust_remote_code", action="store_true",
                        help="refused: flax-lm never runs a dataset's loading script")
    source.add_argument("--dataset_split", default="train", help="hub split (default: train)")
    source.add_argument(
        "--streaming", action="store_true", help="read lazily, without a datasets cache"
    )
    source.add_argument("--train_file", nargs="+", help="files, directories (recursive) or globs")
    source.add_argument("--text_column", default="text", help="column holding the text")
    source.add_argument("--max_samples", type=int, help="use only the first N documents")
    source.add_argument("--cache_dir", help="datasets cache directory")
    source.add_argument("--token", help="Hub token for a gated or private dataset (default: "
                        "HF_TOKEN or `hf auth login`'s)")
    parser.add_argument("--vocab_size", type=int, default=50265, help="default: 50265")
    parser.add_argument("--min_frequency", type=int, default=2, help="default: 2")
    parser.add_argument("--output_dir", required=True, help="where the tokenizer is saved")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="allow a non-empty output_dir"
    )
    return parser


def check_args(args) -> None:
    if (args.dataset_name is None) == (args.train_file is None):
        raise UserError("give exactly one of --dataset_name and --train_file")
    refuse_remote_code(args.trust_remote_code)
    check_vocab_size(args.vocab_size)
    if args.min_frequency < 1:
        raise UserError(f"--min_frequency must be at least 1, got {args.min_frequency}")
    check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir)


def load_corpus(args) -> Corpus:
    """The corpus as the training scripts will read it (its datasets cache is reused there)."""
    return text_dataset_from_flags(
        args, split=args.dataset_split, data_files=args.train_file, max_samples=args.max_samples
    )


class DocumentCounter:
    """Passes text batches through while counting documents on a tqdm progress bar."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self.documents = 0

    def __iter__(self) -> Iterator[list[str]]:
        total = getattr(self.corpus, "num_rows", None)
        with tqdm(total=total, unit=" docs", desc="reading corpus", file=sys.stderr) as bar:
            for batch in iter_text_batches(self.corpus):
                self.documents += len(batch)
                bar.update(len(batch))
                yield batch


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    warn_about_secrets_on_the_command_line(argv)
    check_args(args)
    corpus = load_corpus(args)
    start = time.perf_counter()
    documents = DocumentCounter(corpus)
    output_dir = train_tokenizer(documents, args.vocab_size, args.min_frequency, args.output_dir)
    vocab_size = Tokenizer.from_file(str(output_dir / "tokenizer.json")).get_vocab_size()
    print(
        f"trained tokenizer on {documents.documents:,} documents: vocab size {vocab_size:,}, "
        f"{time.perf_counter() - start:.1f} s, saved to {output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
