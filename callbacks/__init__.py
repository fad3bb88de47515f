"""Lightning callbacks of the FLM trainer, installed as `flm_lightning.callbacks`.

This folder sits at the top of the repository, but pyproject.toml maps it into the
`flm_lightning` package, so installing the project adds no top-level `callbacks` package
that could clash with another distribution. Configs name them
`flm_lightning.callbacks.<Name>`.
"""

from flm_lightning.callbacks.console import FLMModelSummary, LearningRateLogger, RunFacts, StepProgressBar
from flm_lightning.callbacks.growth import GrowthCallback, GrowthStage
from flm_lightning.callbacks.guard import TrainingGuard
from flm_lightning.callbacks.preemption import PreemptionCheckpoint
from flm_lightning.callbacks.throughput import TokenThroughputMonitor

__all__ = [
    "FLMModelSummary",
    "GrowthCallback",
    "GrowthStage",
    "LearningRateLogger",
    "PreemptionCheckpoint",
    "RunFacts",
    "StepProgressBar",
    "TokenThroughputMonitor",
    "TrainingGuard",
]
