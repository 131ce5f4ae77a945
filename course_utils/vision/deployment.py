"""The deployed model as PyTorch: the one ``course_utils.core.ledger.deployed_model`` names, loaded from its file."""

from __future__ import annotations

from pathlib import Path

from course_utils.core.artifacts import DeployedModel
from course_utils.core.config import CourseConfig
from course_utils.core.ledger import Ledger, deployed_model
from course_utils.vision.zoo import Classifier


def load_model(deployed: DeployedModel, workspace: str | Path) -> Classifier:
    """Load the classifier ``deployed`` names: a pruned model is rebuilt from its pruning history."""
    path = deployed.model.resolve(workspace)
    if deployed.kind == "pruned":
        from course_utils.vision.prune import load_pruned

        return load_pruned(path)
    from course_utils.vision.zoo import load_classifier

    return load_classifier(path)


def load_deployed(config: CourseConfig) -> tuple[Classifier, DeployedModel]:
    """The model every deployment stage starts from, and the ledger's word on which one it is and why.

    A missing fine-tuned model raises ``MissingArtifactError`` naming notebook 02; nothing is trained here.
    """
    deployed = deployed_model(Ledger(config.workspace), config)
    return load_model(deployed, config.workspace), deployed


def load_finetuned(config: CourseConfig) -> Classifier:
    """The fine-tuned model of notebook 02 (the pruning stage's starting point); nothing is trained here."""
    from course_utils.core.ledger import finetuned_model
    from course_utils.vision.zoo import load_classifier

    record = finetuned_model(Ledger(config.workspace), config)
    return load_classifier(record.checkpoint.resolve(config.workspace))
