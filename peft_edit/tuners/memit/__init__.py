from .config import MemitConfig
from .model import MemitTuner

__all__ = ["MemitConfig", "MemitTuner"]
