import torch

from de3bert.policies import ExitPolicy
from tests.conftest import padded_batch, tiny_model


def test_torch_runner_reproduces_the_model_forward():
    model = tiny_model(pooling="mean")
    batch = padded_batch(5, seed=2)
    runner = model.runner
    with torch.no_grad():
        expected = model(**batch).layers
        hidden = runner.embed(batch["input_ids"], None)
        context = runner.context(hidden, batch["attention_mask"])
        for index, layer in enumerate(expected):
            hidden, output = runner.run_layer(index, hidden, batch["attention_mask"], context, ExitPolicy("edr"))
            assert torch.equal(output.logits, layer.logits)
            assert (output.distances is None) == (layer.distances is None) and output.indicators is None
            if layer.distances is not None:
                assert torch.equal(output.distances, layer.distances)


def test_torch_runner_computes_only_what_the_policy_reads():
    model = tiny_model()
    batch = padded_batch(3)
    runner = model.runner
    with torch.no_grad():
        hidden = runner.embed(batch["input_ids"], None)
        context = runner.context(hidden, batch["attention_mask"])
        _, no_head = runner.run_layer(0, hidden, batch["attention_mask"], context, None)
        _, logits_only = runner.run_layer(0, hidden, batch["attention_mask"], context, ExitPolicy("entropy"))
    assert no_head is None and logits_only.distances is None and logits_only.logits.shape == (3, 2)
    assert not model.training  # the runner runs the model in eval mode
