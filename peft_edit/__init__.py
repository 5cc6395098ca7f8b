"""peft-edit: edit the knowledge of language models, and keep every edit as a PEFT adapter.

Importing this package registers the edit adapter types with peft, so ``PeftModel.from_pretrained``
loads saved edits.
"""

from .architectures import UnsupportedModelError
from .edited_model import EditedModel, get_edited_model, load_edited_model
from .fingerprint import BaseWeightsMismatchError
from .registration import register_edit_method
from .requests import EditRequest
from .tuners.rome import RomeConfig, RomeTuner

register_edit_method("rome", RomeConfig, RomeTuner)

__version__ = "0.1.0"

__all__ = [
    "BaseWeightsMismatchError",
    "EditRequest",
    "EditedModel",
    "RomeConfig",
    "UnsupportedModelError",
    "get_edited_model",
    "load_edited_model",
]
