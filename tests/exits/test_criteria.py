import pytest
import torch

from de3bert.errors import PolicyError
from de3bert.exits import criteria
from de3bert.exits.criteria import CRITERIA, Criterion, applicable_criteria, get_criterion, own_criterion
from de3bert.exits.indicators import INDICATORS
from de3bert.exits.policies import ExitPolicy, simulate_exits
from de3bert.model.heads import HeadOutput


def test_every_indicator_a_criterion_names_has_a_formula():
    assert tuple(INDICATORS) == criteria.INDICATORS
    assert {c.indicator for c in CRITERIA.values()} - {None} <= set(INDICATORS)


def test_the_criteria_a_model_supports():
    assert applicable_criteria(regression=False, has_prototypes=True, early_only=True) == (
        "edr", "entropy", "confidence", "dr", "patience", "pcee")
    assert applicable_criteria(regression=False, has_prototypes=False) == (
        "entropy", "confidence", "patience", "pcee", "full-depth")
    assert applicable_criteria(regression=True, has_prototypes=False) == ("regression-patience", "full-depth")


def test_each_recipe_has_its_own_criterion():
    assert [own_criterion(recipe) for recipe in ("de3", "pabee", "deebert")] == ["edr", "patience", "entropy"]
    assert {own_criterion(recipe, regression=True) for recipe in ("de3", "pabee", "deebert")} == {
        "regression-patience"}


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(PolicyError, match="unknown exit criterion 'magic'; choose one of edr, entropy"):
        get_criterion("magic")


def test_a_record_must_read_exactly_one_thing():
    with pytest.raises(ValueError, match="must read one of the indicators"):
        Criterion("both", "both", indicator="entropy", change="prediction")
    with pytest.raises(ValueError, match="must read one of the indicators"):
        Criterion("neither", "neither")


def test_a_never_exiting_policy_computes_every_head_and_exits_only_at_the_end():
    generator = torch.Generator().manual_seed(0)
    outputs = [HeadOutput(torch.randn(64, 3, generator=generator) * 5, torch.rand(64, 3, generator=generator))
               for _ in range(6)]
    for name in applicable_criteria(regression=False, has_prototypes=True, early_only=True):
        policy = ExitPolicy.never_exiting(name, num_layers=6)
        assert policy.reads_internal_heads and policy.criterion == name
        assert simulate_exits(policy, outputs).exit_layers.tolist() == [6] * 64, name
