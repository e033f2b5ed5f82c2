"""Settings: dataclass fields that carry their flag's default, help text and allowed values, so
that one dataclass is the single source of a command's flags (``TrainConfig``,
``fastclip.finetune.FinetuneConfig``; ``fastclip.cli`` builds each parser from its fields)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import Field, field
from typing import Any

from fastclip.checks import check_choice, check_number, number_range, one_of


def setting(
    default: Any,
    help: str,
    choices: Sequence[str] = (),
    *,
    low: float | None = None,
    above: bool = False,
    note: str | None = None,
    flag: Mapping[str, Any] | None = None,
) -> Any:
    """A config field: its default, its ``--flag``'s help and its allowed values: ``choices``
    for a str; for a number (or each number of a list), at least ``low`` (more than ``low`` if
    ``above``). The help ends with ``note`` in brackets, by default the default and the allowed
    values ("": no note). ``flag`` holds argparse's ``add_argument`` keywords where the flag is
    not the usual one: ``nargs`` and the items' ``type``, a bool's ``action="store_true"`` (no
    ``--no-flag``), ``choices`` that argparse lists in the usage (then the note does not)."""
    flag = dict(flag or {})
    limits = None if low is None else dict(low=low, open_low=above)
    metadata = {
        "help": help,
        "choices": tuple(choices or flag.get("choices", ())),
        "range": limits,
        "note": note,
        "flag": flag,
    }
    return field(default=default, metadata=metadata)


def flag_help(f: Field) -> str:
    """The help of a field's flag: its help text, then its note in brackets (the allowed values
    only where the usage does not list them)."""
    note = f.metadata["note"]
    if note is None:
        shown = [f"default: {f.default}"] if f.default != "" else []  # "": not given
        listed = "choices" in f.metadata["flag"]
        note = "; ".join(filter(None, [*shown, "" if listed else allowed(f)]))
    return " ".join(filter(None, [f.metadata["help"], note and f"({note})"]))


def allowed(f: Field) -> str:
    """The values a field allows, in words ("" if any value of its type)."""
    if f.metadata["choices"]:
        return one_of(f.metadata["choices"])
    if f.metadata["range"] is not None:
        return number_range(integer=_integer(f), **f.metadata["range"])
    return ""


def check_setting(f: Field, value: object, name: str) -> None:
    """A ValueError naming ``name`` (the field, or its flag) unless ``value`` (each item of a
    list) is one that the field allows. The default always is: for ``model``, ``loss`` and
    ``vocab_size`` it stands for "not given"."""
    if value == f.default:
        return
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if f.metadata["choices"]:
            check_choice(name, item, f.metadata["choices"])
        elif f.metadata["range"] is not None:
            check_number(name, item, integer=_integer(f), **f.metadata["range"])


def _integer(f: Field) -> bool:
    """Whether the field's values (a list's items) are ints."""
    return issubclass(f.metadata["flag"].get("type", type(f.default)), int)
