"""Running-mean class prototypes: the update rule, what training leaves in them, and several processes."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from de3bert.data import encode_examples, load_split
from de3bert.model.heads import ExitHead
from de3bert.model.prototypes import class_sums, moving_average_update
from de3bert.training.arguments import TrainingArguments
from de3bert.training.trainer import Trainer
from tests.conftest import tiny_model


def test_class_sums_leave_out_unlabelled_rows():
    embeddings = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [100.0, 100.0]])
    sums, counts = class_sums(embeddings, torch.tensor([0, 0, 2, -1]), 3)
    assert sums.tolist() == [[4.0, 6.0], [0.0, 0.0], [5.0, 6.0]]
    assert counts.tolist() == [2.0, 0.0, 1.0]


def test_update_rule_hand_computed():
    prototypes = torch.tensor([[1.0, 1.0], [9.0, 9.0], [0.0, 0.0]])
    initialized = torch.tensor([True, True, False])
    sums = torch.tensor([[6.0, 2.0], [0.0, 0.0], [4.0, 8.0]])
    counts = torch.tensor([2.0, 0.0, 2.0])
    updated, now = moving_average_update(prototypes, initialized, sums, counts, momentum=0.25)
    # class 0: 0.75·(1, 1) + 0.25·(3, 1); class 1 absent: kept; class 2 first seen: its batch mean
    assert updated.tolist() == [[1.5, 1.0], [9.0, 9.0], [2.0, 4.0]]
    assert now.tolist() == [True, True, True]


def test_head_updates_only_in_training_mode_and_only_with_labels():
    torch.manual_seed(0)
    head = ExitHead(4, 2, 3, "sqeuclidean", 0.0, prototype_kind="ema", momentum=0.5)
    hidden, mask = torch.randn(4, 2, 4), torch.ones(4, 2, dtype=torch.long)
    labels = torch.tensor([0, 1, 1, 0])
    head.eval()(hidden, mask, labels=labels)
    head.train()(hidden, mask)
    assert not head.prototype_initialized.any() and not head.prototypes.any()
    output = head.train()(hidden, mask, labels=labels)
    embeddings = head.projection(torch.tanh(head.pooler(hidden[:, 0])))
    expected = torch.stack([embeddings[labels == k].mean(0) for k in (0, 1)])
    assert torch.allclose(head.prototypes, expected.detach(), atol=1e-6)
    # distances are measured to the updated prototypes, and no gradient flows into them
    assert torch.allclose(output.distances, (embeddings.unsqueeze(1) - expected.unsqueeze(0)).pow(2).sum(-1), atol=1e-5)
    assert not head.prototypes.requires_grad and "prototypes" not in dict(head.named_parameters())


def test_prototypes_after_training_equal_the_running_means_recomputed_independently(tmp_path, tokenizer, glue_dir):
    """Train one epoch, record every training-mode embedding and label, and replay the rule in plain Python."""
    momentum = 0.3
    model = tiny_model(tokenizer=tokenizer, prototype_momentum=momentum, dropout=0.0).train()
    task, train_examples = load_split("sst2", "train", str(glue_dir))
    encoded = encode_examples(tokenizer, train_examples, 32)
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), epochs=1, batch_size=16, learning_rate=1e-2,
                             progress=False, save_every_steps=0)
    trainer = Trainer(model, args, task, encoded, encoded[:16], encoded[:16])
    seen = {index: [] for index in range(len(model.heads))}
    batch_labels = []
    model.register_forward_pre_hook(lambda module, args, kwargs: batch_labels.append(kwargs["labels"].clone())
                                    if module.training else None, with_kwargs=True)
    for index, head in enumerate(model.heads[:-1]):
        head.projection.register_forward_hook(
            lambda module, inputs, output, index=index: seen[index].append(output.detach().clone())
            if module.training else None)
    optimizer_params = []
    original = trainer._optimizer
    trainer._optimizer = lambda: optimizer_params.append(opt := original()) or opt
    trainer.train()
    assert len(batch_labels) == trainer.steps_per_epoch == len(seen[0])
    for index, head in enumerate(model.heads[:-1]):
        expected = [None, None]
        for embeddings, labels in zip(seen[index], batch_labels):
            for k in (0, 1):
                rows = embeddings[labels == k]
                if len(rows):
                    mean = rows.mean(0)
                    expected[k] = mean if expected[k] is None else (1 - momentum) * expected[k] + momentum * mean
        assert torch.allclose(head.prototypes, torch.stack(expected), atol=1e-5), index
        assert not head.prototypes.requires_grad
    assert not model.heads[-1].has_prototypes  # no prototypical network where no indicator reads it
    in_optimizer = {id(p) for group in optimizer_params[0].param_groups for p in group["params"]}
    assert not in_optimizer & {id(h.prototypes) for h in model.heads[:-1]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process(rank: int, world: int, port: int, hidden: torch.Tensor, labels: torch.Tensor, folder: str) -> None:
    """One of several processes: update a head's prototypes from its share of the batch, save them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    head = ExitHead(8, 3, 5, "sqeuclidean", 0.0, prototype_kind="ema", momentum=0.5).train()
    shares = torch.tensor_split(torch.arange(labels.shape[1]), world)
    mask = torch.ones(hidden.shape[1:3], dtype=torch.long)
    for step in range(2):
        own = shares[rank]
        head(hidden[step, own], mask[own], labels=labels[step, own])
    torch.save({"prototypes": head.prototypes, "initialized": head.prototype_initialized}, f"{folder}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_end_with_identical_prototypes_equal_to_one_process(tmp_path):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 10, 3, 8, generator=generator)  # two steps of a global batch of 10
    labels = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1],  # class 1 only in the second process's share
                           [2, 1, 0, 2, 1, 0, 2, 1, 0, 2]])
    mp.spawn(_process, args=(2, _free_port(), hidden, labels, str(tmp_path)), nprocs=2)
    first, second = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert torch.equal(first["prototypes"], second["prototypes"])
    torch.manual_seed(0)
    single = ExitHead(8, 3, 5, "sqeuclidean", 0.0, prototype_kind="ema", momentum=0.5).train()
    for step in range(2):
        single(hidden[step], torch.ones(10, 3, dtype=torch.long), labels=labels[step])
    assert torch.allclose(first["prototypes"], single.prototypes, atol=1e-6)
    assert first["initialized"].all()


@pytest.mark.parametrize("kind", ["ema", "learned"])
def test_prototype_kind_round_trips_through_a_checkpoint(tmp_path, tokenizer, kind):
    from de3bert.model.modeling import EarlyExitModel

    model = tiny_model(tokenizer=tokenizer, prototypes=kind)
    model.save_pretrained(tmp_path / kind)
    loaded = EarlyExitModel.from_pretrained(tmp_path / kind)
    assert loaded.config.heads.prototypes == kind and loaded.heads[0].prototype_kind == kind
    assert torch.equal(loaded.heads[0].prototypes, model.heads[0].prototypes)
