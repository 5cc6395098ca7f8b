from .config import AlphaEditConfig
from .model import AlphaEditTuner

__all__ = ["AlphaEditConfig", "AlphaEditTuner"]
