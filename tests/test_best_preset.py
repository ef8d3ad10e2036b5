"""The `best` preset searches what its header and the README promise, read from the registries so that a newly
registered backbone or policy cannot be left out unnoticed: every backbone trained from scratch that takes the
embedded 28x28 images, every augmentation policy and every optimizer. Spec file only, no training."""

from backbones import get_backbone, list_backbones
from data_pipeline.policies import POLICIES
from search.study.spec import load_spec
from search.study.trial_config import OPTIMIZERS


def test_best_searches_every_scratch_backbone_policy_and_optimizer():
    spec = load_spec("best")
    scratch = {name for name in list_backbones()
               if not get_backbone(name).pretrained and get_backbone(name).min_input_size <= 28}
    assert {"compact_cnn", "small_resnet"} <= scratch  # the registry query itself finds the scratch models
    assert sorted(spec.space.backbones) == sorted(scratch)
    assert sorted(spec.space.augment_policies) == sorted(POLICIES)
    assert sorted(spec.space.optimizers) == sorted(OPTIMIZERS)
    assert {entry["backbone"] for entry in spec.warm_start} <= scratch
