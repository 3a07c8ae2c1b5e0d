"""``mtpsl config show [PRESET|FILE] [key=value ...]``: the resolved config, every key with
its meaning and allowed values.

The output is YAML with one comment per key (its type and bounds, the registered names it
may take, its docstring from :mod:`mtpsl.core.config`), so it can be saved and edited as a config
file: ``mtpsl config show synthetic_demo > my.yaml``.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from pydantic import BaseModel

NAMED_BY_REGISTRY = {"dataset.name": "datasets", "model.name": "models",
                     "model.backbone.name": "encoders", "method.name": "methods",
                     "method.weighting": "weightings", "labels.regime": "regimes"}
"""Keys whose value names a registry entry (see ``mtpsl list``)."""
COMMENT_AT = 34


def _method_options(section) -> type:
    from mtpsl.methods import METHODS

    return METHODS.get(section.name).Options


def _weighting_options(section) -> type:
    from mtpsl.weighting import WEIGHTINGS

    return WEIGHTINGS.get(section.weighting).Options


OPTION_MODELS = {"method.options": _method_options,
                 "method.weighting_options": _weighting_options}
"""Free-form mappings validated by the chosen entry's own options model, listed below them."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="show a resolved config with every key "
                                   "explained").add_subparsers(dest="config_cmd", required=True)
    p = config.add_parser(
        "show", help="print the resolved config (defaults filled in) with each key's meaning "
        "and allowed values", description="Print a preset or YAML file (default: the "
        "defaults) after overrides, as YAML with a comment per key.")
    p.add_argument("source", nargs="?", help="preset name or YAML file (see `mtpsl list "
                   "presets`)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from mtpsl.core.config import load_config

    config = load_config(args.source, args.overrides)
    print(f"# {args.source or 'defaults'}, resolved: every key, with its allowed values")
    print("\n".join(explain(config)))


def explain(section, prefix: str = "", indent: int = 0) -> list[str]:
    """YAML lines of ``section`` (a pydantic model), one comment per leaf key."""
    from pydantic import BaseModel

    lines = []
    pad = "  " * indent
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            doc = f"  # {_one_line(field.description)}" if field.description else ""
            lines.append(f"{pad}{name}:{doc}")
            lines += explain(value, key + ".", indent + 1)
            continue
        text = f"{pad}{name}: {_flow(_plain(value))}"
        notes = [allowed(key, field)] + ([_one_line(field.description)]
                                         if field.description else [])
        lines.append(f"{text:<{COMMENT_AT}} # " + ". ".join(n for n in notes if n))
        if key in OPTION_MODELS:
            lines += _option_lines(OPTION_MODELS[key](section), value, pad + "  ")
    return lines


def _option_lines(model: type[BaseModel], given: dict, pad: str) -> list[str]:
    """Comment lines for each option the chosen method or weighting accepts."""
    fields = model.model_fields
    if not fields:
        return [f"{pad}# (takes no options)"]
    lines = [f"{pad}# options it accepts (default unless set above):"]
    for name, field in fields.items():
        value = given.get(name, field.get_default(call_default_factory=True))
        doc = f". {_one_line(field.description)}" if field.description else ""
        text = f"{pad}#   {name}: {_flow(_plain(value))}"
        lines.append(f"{text:<{COMMENT_AT}} # {allowed('', field)}{doc}")
    return lines


def _plain(value: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def _flow(value: Any) -> str:
    """``value`` as one line of flow-style YAML."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def allowed(key: str, field) -> str:
    """What ``key`` accepts: registered names, a literal's choices, a type with its bounds."""
    if key in NAMED_BY_REGISTRY:
        from mtpsl.cli.commands.listing import entries

        names = [n for n, _ in entries(NAMED_BY_REGISTRY[key])]
        return "one of " + ", ".join(names)
    text = type_text(field.annotation)
    bounds = [_bound(m) for m in field.metadata]
    return " ".join([text, *[b for b in bounds if b]])


def type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is tuple:
        return "pair of " + type_text(args[0]) if len(args) == 2 else "tuple"
    if origin is dict:
        return "mapping"
    if annotation is bool:
        return "true or false"
    return getattr(annotation, "__name__", str(annotation))


def _bound(meta: Any) -> str | None:
    for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        if getattr(meta, attr, None) is not None:
            return f"{sign} {getattr(meta, attr)}"
    if getattr(meta, "min_length", None) is not None:
        return f"at least {meta.min_length} item(s)"
    return None
