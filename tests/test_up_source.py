"""``streamfit up`` picks the producer's synthetic source from the model's features, and refuses one
that does not fit with a message naming those that do."""

from __future__ import annotations

import pytest

from pipeline.registry import Registry
from pipeline.settings import load_settings
from pipeline.spec import BUILTIN_SPECS
from pipeline.up import UpError, ensure_model


@pytest.fixture
def settings(tmp_path):
    settings = load_settings(home=tmp_path)
    registry = Registry(settings.registry_url)
    for name in ("higgs", "small", "stagger"):
        registry.create_model(BUILTIN_SPECS[name])  # already there: no alias moves to announce
    return settings


def test_without_a_source_up_streams_the_synthetic_source_that_fits_the_model(settings):
    said, source = ensure_model(settings.model_copy(update={"model": "higgs"}), None)
    assert (said, source) == ("model higgs (30 features)", "synth:higgs")
    assert ensure_model(settings.model_copy(update={"model": "small"}), None)[1] == "synth:hyperplane"
    assert ensure_model(settings.model_copy(update={"model": "stagger"}), None)[1] == "synth:stagger"  # not sea's


def test_a_synthetic_source_of_another_width_is_refused_naming_those_that_fit(settings):
    with pytest.raises(
        UpError, match=r"synth:hyperplane has 10 features but model 'higgs' takes 30: .*\(synth:higgs\)"
    ):
        ensure_model(settings.model_copy(update={"model": "higgs"}), "synth:hyperplane")
    assert ensure_model(settings.model_copy(update={"model": "small"}), "synth:rbf")[1] == "synth:rbf"
