import pytest
import torch

from de3bert.heads import ExitHead, pool_sequence, prototype_distances
from de3bert.modeling import pretrained_pooling


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool_sequence(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool_sequence(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool_sequence(hidden, mask, "max")


def test_head_output_does_not_depend_on_padding_width():
    torch.manual_seed(0)
    head = ExitHead(4, 3, 5, "sqeuclidean", 0.0, pooling="mean").eval()
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    padded = torch.cat([hidden, torch.randn(2, 2, 4)], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 2, dtype=torch.long)], 1)
    short, wide = head(hidden, mask), head(padded, padded_mask)
    assert torch.allclose(short.logits, wide.logits) and torch.allclose(short.distances, wide.distances)


def test_prototype_distances_hand_computed():
    embeddings = torch.tensor([[1.0, 0.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert prototype_distances(embeddings, prototypes, "sqeuclidean").tolist() == [[0.0, 5.0]]
    assert prototype_distances(embeddings, prototypes, "cosine").tolist() == [[0.0, 1.0]]


def test_sentence_embedding_backbone_is_pooled_by_mean(tiny_backbone_dir):
    assert pretrained_pooling("minilm-l6") == "mean"
    assert pretrained_pooling(str(tiny_backbone_dir)) == "cls"
