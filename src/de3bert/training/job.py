"""A training job: what a run was asked to do — its data, backbone, arguments and head shape. It is saved with the
training state, so that `resume` needs only the output folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from de3bert.data import DataSource, GlueSource, source_from_dict
from de3bert.model.config import ExitHeadConfig
from de3bert.training.arguments import TrainingArguments


@dataclass
class TrainingJob:
    """What a training run was asked to do."""

    data: DataSource
    backbone: str
    args: TrainingArguments
    heads: ExitHeadConfig = field(default_factory=ExitHeadConfig)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {**asdict(self), "data": self.data.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainingJob:
        """Inverse of to_dict; reads the GLUE task, data_dir and hub_dataset that states from before data sources
        hold instead of a source."""
        data = dict(data)
        if "task" in data:
            data["data"] = GlueSource(data.pop("task"), data.pop("data_dir", None), data.pop("hub_dataset", None))
        else:
            data["data"] = source_from_dict(data["data"])
        return cls(**{**data, "args": TrainingArguments(**data["args"]), "heads": ExitHeadConfig(**data["heads"])})
