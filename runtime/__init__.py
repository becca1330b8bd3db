"""Runtime: wrap a transformers model so each adapted linear routes through an adapter mixture."""

from .answer import Answer, answer
from .bank import AdapterBank
from .model import MixtureLinear, RoutedModel
from .trace import Trace

__all__ = ["AdapterBank", "Answer", "answer", "MixtureLinear", "RoutedModel", "Trace"]
