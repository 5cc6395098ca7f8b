from .config import TPatcherConfig
from .model import TPatcherTuner

__all__ = ["TPatcherConfig", "TPatcherTuner"]
