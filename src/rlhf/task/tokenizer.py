"""A byte-level BPE tokenizer trained on the built-in corpus, in Hugging Face format."""

from __future__ import annotations

BOS_EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, as a PreTrainedTokenizerFast that prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS_EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_EOS} $A", pair=f"{BOS_EOS} $A $B", special_tokens=[(BOS_EOS, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_EOS,
        eos_token=BOS_EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=1024,
    )
