"""A word-level tokenizer trained offline on the synthetic world's training text.

Word level keeps every name part and every attribute value a single token, so "the value token"
of a fact is one position. The pre-tokenizer splits words from punctuation (`\\w+|[^\\w\\s]+`),
and the special tokens follow OPT's convention: `</s>` is both BOS and EOS, `<pad>` pads.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, UNK = "<pad>", "</s>", "<unk>"


def train_tokenizer(texts: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """Learn the vocabulary of `texts` (every word seen once or more) as a Hugging Face tokenizer.

    The tokenizer adds no special tokens by itself: callers put BOS in front of documents, as
    tokendyn's extraction does with `bos = true`. `max_length` becomes `model_max_length`.
    """
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[PAD, BOS, UNK]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=PAD, unk_token=UNK, model_max_length=max_length
    )
