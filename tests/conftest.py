"""Shared fixtures: tiny randomly initialized backbones and models, so unit tests stay fast."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, MPNetConfig, MPNetModel

from de3bert.model.backbones import Backbone, resolve_backbone
from de3bert.model.config import EarlyExitConfig, ExitHeadConfig
from de3bert.model.modeling import EarlyExitModel

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=30522,
            max_position_embeddings=128)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded MiniLM WordPiece tokenizer (vocabulary 30522, offline)."""
    return AutoTokenizer.from_pretrained(resolve_backbone("minilm-l6"))


def tiny_bert() -> BertModel:
    """A 4-layer, 32-wide random BERT."""
    torch.manual_seed(0)
    return BertModel(BertConfig(**TINY)).eval()


def tiny_mpnet() -> MPNetModel:
    """A 4-layer, 32-wide random MPNet."""
    torch.manual_seed(0)
    return MPNetModel(MPNetConfig(**TINY)).eval()


def tiny_model(labels=("neg", "pos"), tokenizer=None, **head_kwargs) -> EarlyExitModel:
    """A tiny random EarlyExitModel on a 4-layer BERT."""
    backbone = Backbone(tiny_bert())
    config = EarlyExitConfig(backbone=backbone.config.to_dict(), backbone_name="tiny-bert", task="tiny",
                             labels=list(labels), heads=ExitHeadConfig(**head_kwargs))
    model = EarlyExitModel(config, backbone, tokenizer)
    torch.manual_seed(1)
    model.init_heads()
    return model.eval()


def padded_batch(batch_size: int = 5, max_len: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with right padding of varying lengths."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len + 1, (batch_size,), generator=generator)
    lengths[0] = max_len
    input_ids = torch.randint(1000, 2000, (batch_size, max_len), generator=generator)
    positions = torch.arange(max_len).unsqueeze(0)
    attention_mask = (positions < lengths.unsqueeze(1)).long()
    input_ids = input_ids * attention_mask
    input_ids[:, 0] = 101
    return {"input_ids": input_ids, "attention_mask": attention_mask}


POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "terrible", "ugly"]


def write_sst2(folder, train_size: int = 128, dev_size: int = 32, seed: int = 0):
    """A tiny, easily learnable SST-2 in the official layout (header `sentence\\tlabel`)."""
    import random

    rng = random.Random(seed)
    task = folder / "SST-2"
    task.mkdir(parents=True, exist_ok=True)
    for name, size in (("train.tsv", train_size), ("dev.tsv", dev_size)):
        rows = ["sentence\tlabel"]
        for i in range(size):
            label = i % 2
            words = rng.choices(POSITIVE if label else NEGATIVE, k=rng.randint(2, 6))
            rows.append(f"the film was {' '.join(words)}\t{label}")
        (task / name).write_text("\n".join(rows) + "\n")
    return folder


TICKETS = {"billing": ["invoice", "refund", "charge", "payment"], "bug": ["crash", "error", "broken", "freeze"],
           "feature": ["wish", "add", "support", "would"], "login": ["password", "account", "signin", "locked"],
           "praise": ["thanks", "love", "great", "awesome"], "shipping": ["delivery", "package", "parcel", "courier"]}


def write_tickets(path, size: int = 120, seed: int = 0):
    """A learnable six-class task in a user's CSV (header `text,label`, the labels as names), classes in turn."""
    import random

    rng = random.Random(seed)
    rows = ["text,label"]
    for i in range(size):
        label = list(TICKETS)[i % len(TICKETS)]
        rows.append(f"my {' '.join(rng.choices(TICKETS[label], k=rng.randint(2, 4)))} today,{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory, tokenizer):
    """A tiny random BERT saved as a local backbone folder (with the real tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory):
    """A folder holding the tiny SST-2."""
    return write_sst2(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_backbone_dir, glue_dir):
    """A DE³ checkpoint trained for 2 epochs on the tiny SST-2 through the CLI."""
    from de3bert.apps.cli import main

    output = tmp_path_factory.mktemp("run") / "ckpt"
    code = main(["train", "--task", "sst2", "--model", str(tiny_backbone_dir), "--output", str(output),
                 "--epochs", "2", "--learning-rate", "1e-2", "--batch-size", "16", "--data-dir", str(glue_dir),
                 "--no-progress"])
    assert code == 0
    return output


@pytest.fixture(scope="session")
def tickets_dir(tmp_path_factory):
    """A folder with the six-class tickets.csv (training) and test.csv."""
    folder = tmp_path_factory.mktemp("tickets")
    write_tickets(folder / "tickets.csv")
    write_tickets(folder / "test.csv", size=36, seed=1)
    return folder


@pytest.fixture(scope="session")
def tickets_checkpoint(tmp_path_factory, tiny_backbone_dir, tickets_dir):
    """A DE³ checkpoint trained on tickets.csv through the CLI, a validation slice held out."""
    from de3bert.apps.cli import main

    output = tmp_path_factory.mktemp("run") / "tickets"
    code = main(["train", "--train-file", str(tickets_dir / "tickets.csv"), "--model", str(tiny_backbone_dir),
                 "--output", str(output), "--epochs", "6", "--learning-rate", "2e-2", "--batch-size", "16",
                 "--no-progress"])
    assert code == 0
    return output


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_checkpoint):
    """The tiny DE³ checkpoint exported to ONNX (float32)."""
    pytest.importorskip("onnxruntime")
    from de3bert.onnx.export import export_checkpoint

    output = tmp_path_factory.mktemp("export") / "onnx"
    export_checkpoint(tiny_checkpoint, output)
    return output
