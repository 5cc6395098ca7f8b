"""peft-edit: edit the knowledge of language models, and keep every edit as a PEFT adapter.

Importing this package registers the edit adapter types with peft, so ``PeftModel.from_pretrained``
loads saved edits.
"""

from .architectures import UnsupportedModelError
from .edited_model import EditedModel, get_edited_model, load_edited_model
from .fingerprint import BaseWeightsMismatchError
from .registration import register_edit_method
from .requests import EditRequest
from .tuners.alphaedit import AlphaEditConfig, AlphaEditTuner
from .tuners.ft import FTConfig, FTTuner
from .tuners.grace import GraceConfig, GraceTuner
from .tuners.memit import MemitConfig, MemitTuner
from .tuners.rome import RomeConfig, RomeTuner
from .tuners.tpatcher import TPatcherConfig, TPatcherTuner
from .tuners.wise import WiseConfig, WiseTuner

register_edit_method("alphaedit", AlphaEditConfig, AlphaEditTuner)
register_edit_method("ft", FTConfig, FTTuner)
register_edit_method("grace", GraceConfig, GraceTuner)
register_edit_method("memit", MemitConfig, MemitTuner)
register_edit_method("rome", RomeConfig, RomeTuner)
register_edit_method("tpatcher", TPatcherConfig, TPatcherTuner)
register_edit_method("wise", WiseConfig, WiseTuner)

__version__ = "0.1.0"

__all__ = [
    "AlphaEditConfig",
    "BaseWeightsMismatchError",
    "EditRequest",
    "EditedModel",
    "FTConfig",
    "GraceConfig",
    "MemitConfig",
    "RomeConfig",
    "TPatcherConfig",
    "UnsupportedModelError",
    "WiseConfig",
    "get_edited_model",
    "load_edited_model",
]
