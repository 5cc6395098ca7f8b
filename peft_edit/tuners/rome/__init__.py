from .config import RomeConfig
from .model import RomeTuner

__all__ = ["RomeConfig", "RomeTuner"]
