"""The auto-tuner: a sync that chooses its own wire format, H, τ and fragments (docs/autotune.md).

``model`` is the cost model and the decision (pure); ``tuner`` measures and applies it.
"""

from lightning_localsgd.tuning.model import FORMATS, AutoTune, Decision, Measurements, decide
from lightning_localsgd.tuning.tuner import AutoTuner

__all__ = ["FORMATS", "AutoTune", "AutoTuner", "Decision", "Measurements", "decide"]
