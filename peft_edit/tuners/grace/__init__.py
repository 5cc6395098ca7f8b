from .config import GraceConfig
from .layer import GraceLayer
from .model import GraceTuner

__all__ = ["GraceConfig", "GraceLayer", "GraceTuner"]
