import pytest
import torch

from de3bert.errors import BackboneError
from de3bert.model.backbones import Backbone, load_backbone, resolve_backbone
from tests.conftest import padded_batch, tiny_bert, tiny_mpnet


def layer_loop(backbone: Backbone, batch) -> torch.Tensor:
    hidden = backbone.embed(batch["input_ids"], batch.get("token_type_ids"))
    context = backbone.context(hidden, batch["attention_mask"])
    for index in range(backbone.num_layers):
        hidden = backbone.run_layer(index, hidden, context)
    return hidden


@pytest.mark.parametrize("make_encoder", [tiny_bert, tiny_mpnet], ids=["bert", "mpnet"])
def test_layer_loop_equals_encoder_forward_with_padding(make_encoder):
    encoder = make_encoder()
    batch = padded_batch()
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        expected = encoder(**batch).last_hidden_state
        actual = layer_loop(Backbone(encoder), batch)
    real = batch["attention_mask"].bool()
    assert (actual - expected)[real].abs().max() < 1e-5


def test_embedded_minilm_layer_loop_equals_forward():
    backbone, tokenizer = load_backbone("minilm-l6")
    batch = tokenizer(["a short one", "a much longer sentence with padding at the end of the other"],
                      padding=True, return_tensors="pt")
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(resolve_backbone("minilm-l6")).eval()
    backbone.eval()
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        actual = layer_loop(backbone, batch)
    assert backbone.num_layers == 6 and backbone.hidden_size == 384
    real = batch["attention_mask"].bool()
    assert (actual - expected)[real].abs().max() < 1e-5


def test_unknown_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="could not load backbone"):
        load_backbone(str(tmp_path / "nowhere"))


def test_unsupported_architecture_is_rejected():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(BackboneError, match="not supported"):
        Backbone(GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2)))
