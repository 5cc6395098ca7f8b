from .config import FTConfig
from .model import FTTuner

__all__ = ["FTConfig", "FTTuner"]
