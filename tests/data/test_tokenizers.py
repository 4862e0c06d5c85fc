from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lr_lightning.data.text_sources import default_corpus
from lr_lightning.data.tokenizers import BPETokenizer, PretrainedTokenizer, parse_tokenizer_spec

TEXT = default_corpus()[:60_000]


def save_hf_tokenizer(folder: Path, texts: list[str], vocab_size: int = 300) -> Path:
    """A tiny byte-level BPE with <s>, </s> and one added token, saved as a Hugging Face tokenizer folder."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    wrapped.add_tokens(["<extra_token>"])
    wrapped.save_pretrained(folder)
    return folder


def test_bpe_trained_from_a_stream_equals_bpe_trained_on_the_whole_text():
    streamed = BPETokenizer.train_from_texts((line for line in TEXT.splitlines(keepends=True)), vocab_size=400)
    whole = BPETokenizer.train(TEXT, vocab_size=400)
    assert streamed.fingerprint() == whole.fingerprint()
    assert streamed.encode(TEXT[:3_000]) == whole.encode(TEXT[:3_000])
    assert BPETokenizer.train(TEXT, vocab_size=300).fingerprint() != whole.fingerprint()


def test_a_saved_hugging_face_tokenizer_loads_by_path(tmp_path):
    folder = save_hf_tokenizer(tmp_path / "tok", TEXT.splitlines())
    tokenizer = PretrainedTokenizer(str(folder))
    reference = PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert tokenizer.vocab_size == len(reference) == reference.vocab_size + 1  # the added token counts
    assert tokenizer.eos_id == reference.convert_tokens_to_ids("</s>")
    ids = tokenizer.encode("def f(x): return x")
    assert reference.bos_token_id not in ids and tokenizer.decode(ids) == "def f(x): return x"


def test_the_hugging_face_fingerprint_follows_the_folder_contents(tmp_path):
    folder = save_hf_tokenizer(tmp_path / "tok", TEXT.splitlines())
    before = PretrainedTokenizer(folder).fingerprint()
    assert PretrainedTokenizer(folder).fingerprint() == before
    save_hf_tokenizer(folder, TEXT.splitlines(), vocab_size=350)
    assert PretrainedTokenizer(folder).fingerprint() != before


def test_a_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(ValueError, match="not a loadable Hugging Face tokenizer directory") as error:
        PretrainedTokenizer(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_tokenizer_spec(tmp_path):
    assert parse_tokenizer_spec("byte") == "byte" and parse_tokenizer_spec("bpe") == "bpe"
    assert parse_tokenizer_spec(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match=r"tokenizer must be one of \('byte', 'bpe'\) or the path.*'word'"):
        parse_tokenizer_spec("word")
