"""Word-level tokenizer over the scene grammar and a tiny T5 text encoder (real ``transformers`` classes).

The tokenizer is a ``tokenizers`` WordLevel model wrapped in :class:`transformers.PreTrainedTokenizerFast`, so a
pipeline saves and loads it like any Hugging Face tokenizer. Every caption ends with ``[EOS]``, so the empty
negative prompt of classifier-free guidance still has one real token.
"""
from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from .data import VOCABULARY

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[EOS]")
MAX_TEXT_TOKENS = 32  # the longest grammar caption (two striped moving objects + pan) is 26 words + [EOS]


def build_vocab(words=VOCABULARY) -> dict[str, int]:
    """Token ids: specials first ([PAD]=0, [UNK]=1, [EOS]=2), then the grammar's words in sorted order."""
    return {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + sorted(words))}


def build_tokenizer(vocab: dict[str, int] | None = None, max_length: int = MAX_TEXT_TOKENS) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace/punctuation-splitting word tokenizer that appends ``[EOS]``."""
    vocab = vocab or build_vocab()
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
        model_max_length=max_length, padding_side="right",
    )


def text_encoder_config(vocab_size: int, d_model: int = 128) -> T5Config:
    """A 2-layer T5 encoder: 4 heads x 32, gated-GELU feed-forward of 256, no dropout."""
    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=32, d_ff=256, num_layers=2, num_heads=d_model // 32,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, tie_word_embeddings=False,
    )


def build_text_encoder(vocab_size: int, d_model: int = 128) -> T5EncoderModel:
    return T5EncoderModel(text_encoder_config(vocab_size, d_model))
