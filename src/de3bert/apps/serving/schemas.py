"""The bodies of the service's requests and answers (pydantic models: validated on the way in, documented at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from de3bert.exits.criteria import CRITERIA


class TextInput(BaseModel):
    """One input: a text, or a text pair for pair tasks (RTE, MRPC, QNLI, ...)."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="the text to classify", examples=["a gripping, funny film"])
    text_pair: str | None = Field(None, description="second text of a pair (pair tasks only)")


class PolicyOverride(BaseModel):
    """Per-request exit policy: a criterion with threshold/patience/λ, or a target layer speed-up.

    Fields left out come from the served default policy when the criterion is the default's, else
    from ExitPolicy's defaults. target_speedup picks threshold and patience from the checkpoint's
    calibrated table (interpolated between calibrated targets) and is refused outside its range.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    criterion: str | None = Field(None, description=f"one of {', '.join(CRITERIA)}")
    threshold: float | None = Field(None, description="τ in [0, 1] (tolerance for regression-patience)")
    patience: int | None = Field(None, description="consecutive confident layers needed to exit")
    lam: float | None = Field(None, description="λ of the hybrid indicator EDR")
    target_speedup: float | None = Field(None, description="layer speed-up within the calibrated range")


class PredictRequest(BaseModel):
    """Body of POST /v1/predict."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[TextInput] = Field(min_length=1, description="texts (or pairs) to classify, answered in order")
    policy: PolicyOverride | None = Field(None, description="exit policy for this request (default: the served one)")
    explain: bool = Field(False, description="also return every layer each input passed through: prediction, "
                                             "probabilities and the criterion's indicator (costs a full-depth pass)")


class PolicyInfo(BaseModel):
    """An exit policy as applied."""

    criterion: str
    threshold: float
    patience: int
    lam: float


class LayerOut(BaseModel):
    """One layer an input passed through, as its exit policy saw it."""

    layer: int = Field(description="1-based layer")
    label: str | None = Field(description="the layer's predicted label (None for regression)")
    score: float | None = Field(description="the layer's predicted score (regression only)")
    probabilities: dict[str, float] | None = Field(description="the layer's class probabilities, by label name")
    indicator: float | None = Field(description="the criterion's indicator at this layer (see `explain.indicator`); "
                                                 "null where it has no finite value")
    streak: int = Field(description="consecutive layers up to this one on which the criterion held; the input exits "
                                    "when it reaches `patience` (or at the last layer)")


class ExplanationOut(BaseModel):
    """Where one input exits and why: the layers it passed through and how to read their indicator."""

    indicator: str = Field(description="what `layers[].indicator` holds: edr, entropy, confidence or dr; "
                                       "prediction_changed (patience: 1 where the label changed from the layer "
                                       "before) or score_change (regression patience: |Δ score|)")
    holds_when: str = Field(description="the criterion holds where the indicator is below or above the threshold "
                                        "(never: full depth)")
    threshold: float | None = Field(description="the threshold the policy compared the indicator with")
    patience: int = Field(description="consecutive layers the criterion must hold on for the input to exit")
    layers: list[LayerOut] = Field(description="layer 1 to the exit layer; the layers after it were saved")


class PredictionOut(BaseModel):
    """One input's answer."""

    label: str | None = Field(description="predicted label's name (None for regression)")
    score: float | None = Field(description="predicted score (regression only)")
    probabilities: dict[str, float] | None = Field(description="class probabilities at the exit layer, by label name")
    exit_layer: int = Field(description="1-based layer the input left at")
    indicator: float | None = Field(description="the criterion's indicator value at the exit layer (null for a "
                                                "prototype criterion at a last layer without prototypes)")
    # left out of the body unless asked for, so answers without explain stay as they were
    explain: ExplanationOut | None = Field(None, exclude_if=lambda value: value is None,
                                           description="only with explain: true in the request")


class PredictResponse(BaseModel):
    """Body of a successful POST /v1/predict."""

    model_version: str
    policy: PolicyInfo
    predictions: list[PredictionOut]


class ModelInfo(BaseModel):
    """Body of GET /v1/model."""

    model_version: str
    backbone: str
    task: str
    labels: list[str] = Field(description="label names, in the order of the model's outputs")
    text_pairs: bool = Field(description="whether the model reads text pairs (it was trained on pairs): send "
                                         "text_pair with each text")
    num_layers: int
    max_length: int
    heads: dict = Field(description="exit-head configuration")
    criteria: list[str] = Field(description="criteria this model supports")
    criterion_labels: dict[str, str] = Field(description="how to name each of those criteria (the method's name "
                                                         "where the model was trained with that method's recipe)")
    policy: PolicyInfo = Field(description="the default policy (calibrated at training time)")
    calibration: list[dict] = Field(description="calibrated trade-off table: criterion, target and measured speed-up")
    limits: dict[str, int]
    micro_batching: dict[str, bool | int | float]


class Health(BaseModel):
    """Body of GET /healthz."""

    status: str
    model_version: str
