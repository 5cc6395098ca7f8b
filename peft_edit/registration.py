"""Teach peft about the edit adapter types.

peft looks adapter types up in the ``PeftType`` enum and offers no public way to extend it, so
the member is added here by hand before ``register_peft_method`` is called. Registering is
idempotent: importing peft_edit twice (or reloading it) is harmless.

The member's *value* is what ``adapter_config.json`` stores as ``peft_type``. It spells out what
to do, because a process that loads the adapter without importing peft_edit first only gets a
bare ``KeyError`` carrying that value from peft.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

# method name -> its config class, filled by register_edit_method (the CLI and the evaluation
# harness look methods up here).
EDIT_METHODS: dict[str, type] = {}

HINT = " (a peft-edit adapter: run `import peft_edit` before loading it)"


def peft_type_value(method: str) -> str:
    return method.upper() + HINT


def add_peft_type(method: str) -> PeftType:
    """Add ``PeftType.<METHOD>`` if it is not there yet; return the member."""
    name = method.upper()
    if name in PeftType.__members__:
        return PeftType[name]
    value = peft_type_value(method)
    member = str.__new__(PeftType, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_edit_method(method: str, config_cls, model_cls) -> None:
    """Register one edit method with peft (once per process)."""
    EDIT_METHODS[method] = config_cls
    peft_type = add_peft_type(method)
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    # peft.utils.register_peft_method insists that the member's value equals its name, which would
    # lose the hint above; these are the three tables it fills.
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls


def edit_method_config(method: str, **fields):
    """A config of the method registered as ``method`` (``"rome"``, ``"memit"``, ...), with ``fields`` set."""
    key = method.lower().replace("_", "-")
    if key not in EDIT_METHODS:
        raise ValueError(f"Unknown edit method {method!r}; known methods: {', '.join(sorted(EDIT_METHODS))}.")
    return EDIT_METHODS[key](**fields)
