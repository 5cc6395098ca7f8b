from .config import WiseConfig
from .model import WiseTuner

__all__ = ["WiseConfig", "WiseTuner"]
