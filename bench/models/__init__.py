"""The model zoo: architectures (registered in :data:`bench.core.registry.MODELS`), checkpoints,
pinned third-party weights, the training recipe and classifier specs.

Every model takes images in [0, 1] (its first module normalises), has ``num_classes``,
``arch``, ``arch_kwargs`` and ``feature_dim``, and ``features(x)`` returning the penultimate
latent (the input of its last linear layer).
"""

from bench.core.registry import create_model, list_models
from bench.models import cifar_resnet, imagenet_resnet, preact_resnet, small  # noqa: F401 (register)
from bench.models.checkpoint import (
                                     CheckpointError,
                                     ChecksumError,
                                     load_checkpoint,
                                     read_checkpoint_config,
                                     save_checkpoint,
                                     sha256_file,
                                     state_dict_sha256,
                                     verify_sha256,
)
from bench.models.layers import Normalize
from bench.models.pretrained import PRETRAINED, PretrainedEntry, list_pretrained, load_pretrained
from bench.models.training import (
                                     RECIPES,
                                     TrainRecipe,
                                     evaluate_accuracy,
                                     get_recipe,
                                     train_classifier,
)
from bench.models.zoo import describe_classifier, load_classifier, resolve_classifier

__all__ = [
    "CheckpointError", "ChecksumError", "Normalize", "PRETRAINED", "PretrainedEntry", "RECIPES",
    "TrainRecipe", "create_model", "describe_classifier", "evaluate_accuracy", "get_recipe",
    "list_models", "list_pretrained", "load_checkpoint", "load_classifier", "load_pretrained",
    "read_checkpoint_config", "resolve_classifier", "save_checkpoint", "sha256_file",
    "state_dict_sha256", "train_classifier", "verify_sha256",
]
