"""The deployed model as PyTorch: the one ``course_utils.core.ledger.deployed_model`` names, loaded from its file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def deploy_decision(config: CourseConfig) -> list[dict[str, Any]]:
    """Notebook 03's decision as a small table: the unpruned and the pruned model side by side (validation top-1,
    MACs, CPU latency, file size), the target, and which one ships and why (``deployed_model``'s answer).

    Reads the pruning stage's record only; raises ``MissingArtifactError`` naming notebook 03 before it ran.
    """
    from course_utils.core.artifacts import PruneRecord

    ledger = Ledger(config.workspace)
    pruned = ledger.require(PruneRecord)
    deployed = deployed_model(ledger, config)
    figures = pruned.metrics
    rows = []
    for kind, words, suffix, top1 in (("finetuned", "unpruned (notebook 02)", "before", "val_top1_unpruned"),
                                      ("pruned", f"pruned (ratio {figures.get('ratio', '?')})", "after",
                                       "val_top1_after_retrain")):
        rows.append({"model": words, "val top-1": figures.get(top1), "MACs": figures.get(f"macs_{suffix}"),
                     "CPU ms b1": figures.get(f"latency_ms_b1_{suffix}"),
                     "CPU ms b8": figures.get(f"latency_ms_b8_{suffix}"), "file MB": figures.get(f"file_mb_{suffix}"),
                     "ships": "yes" if deployed.kind == kind else "no"})
    rows.append({"model": f"target: {pruned.target}", "val top-1": f"{-pruned.top1_drop * 100:+.1f} points",
                 "MACs": f"{-pruned.macs_reduction:+.0%}", "CPU ms b1": "", "CPU ms b8": "", "file MB": "",
                 "ships": f"{'met' if pruned.meets_target else 'missed'}: {deployed.reason}"})
    return rows
