"""Runtime: wrap a transformers model so each adapted linear routes through an adapter mixture.

The path of a request: requests → step plan (plan.py) → MixtureLinear layers (wrap.py) →
kernels → tokens; adapters come from a library (AdapterBank) or trainable skills (sources.py).
"""

from .answer import Answer, answer
from .bank import AdapterBank, CapacityError
from .model import RoutedModel
from .plan import Engine, StepPlan
from .sources import LibrarySource, TrainableSource, head_view
from .trace import Trace
from .wrap import MixtureLinear, resolve_targets

__all__ = ["AdapterBank", "Answer", "CapacityError", "Engine", "LibrarySource", "MixtureLinear", "RoutedModel",
           "StepPlan", "Trace", "TrainableSource", "answer", "head_view", "resolve_targets"]
