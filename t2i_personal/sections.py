"""The base of every config section: unknown keys are errors and numbers are never booleans. Method sections
also accept, at their default values, the keys other methods own (configs saved before the sections were split
hold every key of every method)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        # pydantic reads true as 1: `max_train_steps: true` would silently train one step
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if isinstance(value, bool) and field is not None and _takes_number_not_bool(field.annotation):
                    raise ValueError(f"{key} expects a number, not the boolean {str(value).lower()}")
        return data


def _takes_number_not_bool(annotation: Any) -> bool:
    types = set(getattr(annotation, "__args__", ())) | {annotation}
    return bool(types & {int, float}) and bool not in types


class MethodSection(Section):
    """The ``method`` section of one method (``method.name`` chooses which)."""

    #: keys of other methods with their defaults: dropped when at the default, refused otherwise
    other_methods_keys: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _other_methods_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        changed = [k for k, default in cls.other_methods_keys.items() if k in data and not _same(data[k], default)]
        if changed:
            raise ValueError(cls.not_mine_message(changed))
        return {k: v for k, v in data.items() if k not in cls.other_methods_keys}

    @classmethod
    def not_mine_message(cls, keys: list[str]) -> str:
        name = cls.model_fields["name"].default
        return f"{', '.join('method.' + k for k in keys)} does not apply to method.name {name}: remove it"


def _same(value: Any, default: Any) -> bool:
    """``value`` equals ``default``, a section counting as equal when its given keys are at their defaults."""
    if isinstance(default, BaseModel):
        given = value.model_dump() if isinstance(value, BaseModel) else value
        return isinstance(given, dict) and all(getattr(default, k, object()) == v for k, v in given.items())
    return value == default
