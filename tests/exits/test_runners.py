import torch

from de3bert.exits.engine import EarlyExitEngine
from de3bert.exits.policies import ExitPolicy
from de3bert.exits.runners import ExitRunner
from tests.conftest import padded_batch, tiny_model


def test_the_pytorch_model_is_a_runner_that_reproduces_its_forward():
    model = tiny_model(pooling="mean")
    batch = padded_batch(5, seed=2)
    runner: ExitRunner = model
    with torch.no_grad():
        expected = model(**batch).layers
        hidden = runner.embed(batch["input_ids"], None)
        context = runner.context(hidden, batch["attention_mask"])
        for index, layer in enumerate(expected):
            hidden, output = runner.run_layer(index, hidden, batch["attention_mask"], context,
                                              ExitPolicy("edr").head_reads)
            assert torch.equal(output.logits, layer.logits)
            assert (output.distances is None) == (layer.distances is None) and output.indicators is None
            if layer.distances is not None:
                assert torch.equal(output.distances, layer.distances)


def test_the_runner_computes_only_what_the_policy_reads():
    model = tiny_model().train()
    batch = padded_batch(3)
    EarlyExitEngine(model, ExitPolicy("entropy"))
    assert not model.training  # the engine runs the model in eval mode
    with torch.no_grad():
        hidden = model.embed(batch["input_ids"], None)
        context = model.context(hidden, batch["attention_mask"])
        _, no_head = model.run_layer(0, hidden, batch["attention_mask"], context, None)
        _, logits_only = model.run_layer(0, hidden, batch["attention_mask"], context, ExitPolicy("entropy").head_reads)
    assert no_head is None and logits_only.distances is None and logits_only.logits.shape == (3, 2)
