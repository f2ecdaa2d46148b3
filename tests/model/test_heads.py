import pytest
import torch

from de3bert.model.backbones import PretrainedBackbone
from de3bert.model.heads import ExitHead, pool_sequence, prototype_distances


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
    assert PretrainedBackbone.find("minilm-l6").pooling == "mean"
    assert PretrainedBackbone.find(str(tiny_backbone_dir)).pooling == "cls"


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_prototype_distances_of_half_precision_do_not_overflow(metric):
    embeddings = torch.full((1, 64), 100.0, dtype=torch.float16)  # ||e||² = 640000 > 65504, float16's largest
    prototypes = torch.stack([torch.zeros(64), torch.full((64,), 100.0)]).half()
    distances = prototype_distances(embeddings, prototypes, metric)
    assert distances.dtype == torch.float32
    expected = [[640000.0, 0.0]] if metric == "sqeuclidean" else [[1.0, 0.0]]
    assert distances.tolist() == expected


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_head_of_huge_hidden_states_is_finite(pooling, autocast):
    torch.manual_seed(0)
    head = ExitHead(16, 3, 8, "sqeuclidean", 0.0, pooling=pooling).eval()
    with torch.no_grad():
        head.prototypes.normal_()
    hidden = torch.randn(4, 6, 16) * 1e30
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = head(hidden, torch.ones(4, 6, dtype=torch.long))
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.distances).all()
    assert (output.distances >= 0).all()
