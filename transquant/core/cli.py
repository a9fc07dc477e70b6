"""The command line of the entry points that are not Hydra apps (report, bench): the same
``key=value`` overrides with the same dotted keys as ``conf/config.yaml``, so one store is named
the same way everywhere (``tracking.uri=sqlite:///x/mlflow.db``), plus plain positional words.

Values use Hydra's override grammar (``key=[a,b]``, ``key='a b'``, ``null``, ``true``) and are
checked against a dataclass schema, so a typo is an error naming it instead of a silent default.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Callable, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import TransquantError
from .paths import CONF_PATH


def default_tracking_uri() -> str:
    """``tracking.uri`` of ``conf/config.yaml``, resolved as a job resolves it ($MLFLOW_TRACKING_URI wins)."""
    return OmegaConf.load(CONF_PATH / "config.yaml").tracking.uri


@dataclass
class Tracking:
    """The store to read; ``experiment`` None = every experiment of it."""
    uri: str = field(default_factory=default_tracking_uri)
    experiment: Optional[str] = None


class CliError(TransquantError):
    """A token of the command line that is not a known ``key=value`` (or an allowed word)."""


def keys(schema: type, prefix: str = "") -> dict[str, object]:
    """Dotted key -> type of every leaf of a dataclass schema."""
    out = {}
    for name, tp in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(tp):
            out.update(keys(tp, f"{prefix}{name}."))
        else:
            out[prefix + name] = tp
    return out


def _literal(word: str) -> str:
    """``word`` as an override value: quoted unless the grammar takes it bare."""
    return word if re.fullmatch(r"[\w./:@+\-]+", word) else "'" + word.replace("'", "\\'") + "'"


def _show(value) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, ListConfig):
        return "[" + ",".join(_literal(str(v)) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _flag_hint(argv: list[str], i: int, allowed: dict[str, object]) -> str:
    """What to write instead of the old-style ``--flag [value ...]`` at ``argv[i]``."""
    name, inline, value = argv[i].lstrip("-").partition("=")
    negated = name.startswith("no-")
    bare = name[3:] if negated else name
    key = next((k for k in allowed if k.replace(".", "-") == bare or k.rsplit(".", 1)[-1] == bare.replace("-", "_")),
               None)
    if key is None:
        return f"unknown option '{argv[i]}'"
    tp = allowed[key]
    if tp is bool:
        return f"'{argv[i]}': write {key}={str(not negated).lower()}"
    values = [value] if inline else []
    for word in [] if inline else argv[i + 1:]:
        if word.startswith("-") or "=" in word:
            break
        values.append(word)
    if list in (typing.get_origin(t) for t in (tp, *typing.get_args(tp))):  # List[str] or Optional[List[str]]
        items = values[0].split(",") if len(values) == 1 else values  # one word: the old comma-separated form
        value = "[" + ",".join(map(_literal, items)) + "]"
    else:
        value = _literal(values[0]) if values else "VALUE"
    write = f"{key}={value}"
    return f"'{argv[i]}': write " + (write if re.fullmatch(r"[\w./:@+\-=\[\],]+", write) else f'"{write}"')


def parse(argv: list[str], schema: type, words: bool = True) -> tuple[list[str], DictConfig]:
    """(positional words, the schema's config with the overrides of ``argv`` applied)."""
    cfg = OmegaConf.structured(schema)
    allowed = keys(schema)
    listing = f"allowed keys: {', '.join(allowed)}"
    parser = OverridesParser.create()
    positional = []
    for i, token in enumerate(argv):
        if token.startswith("-"):
            raise CliError(f"{_flag_hint(argv, i, allowed)} (options are key=value overrides, as for "
                           f"transquant.run; {listing})")
        if "=" not in token and not token.startswith(("+", "~")):
            if not words:
                raise CliError(f"unexpected word '{token}': write key=value ({listing})")
            positional.append(token)
            continue
        try:
            override = parser.parse_override(token)
        except HydraException as err:
            raise CliError(f"malformed override '{token}': {str(err).splitlines()[0]} (quote a value with spaces, "
                           f"commas or brackets: key='a b'; {listing})") from err
        if override.key_or_group not in allowed:
            raise CliError(f"unknown key '{override.key_or_group}' in '{token}' ({listing})")
        if override.type is not OverrideType.CHANGE or override.package is not None:
            raise CliError(f"'{token}': write plain key=value ({listing})")
        if override.is_sweep_override():
            choices = getattr(override.value(), "list", ["a", "b"])
            raise CliError(f"'{token}' is a sweep: one value per key here; a list is written "
                           f"{override.key_or_group}=[{','.join(_literal(str(c)) for c in choices)}]")
        try:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
        except OmegaConfBaseException as err:
            raise CliError(f"'{token}': {str(err).splitlines()[0]}") from err
    return positional, cfg


def usage(prog: str, schema: type, words: str | None, description: str) -> str:
    """The ``-h`` text: synopsis, what the entry point does, every key with its default."""
    defaults = OmegaConf.structured(schema)
    lines = [f"usage: python -m {prog}" + (f" [{words} ...]" if words else "") + " [key=value ...]", "",
             description.strip(), "", "keys (default):"]
    lines += [f"  {key}={_show(OmegaConf.select(defaults, key))}" for key in keys(schema)]
    return "\n".join(lines)


def main(prog: str, schema: type, body: Callable[[list[str], DictConfig], int], argv: list[str] | None = None,
         words: str | None = None, description: str = "", errors: tuple[type[Exception], ...] = ()) -> int:
    """Run ``body(words, cfg)`` on the parsed command line; exit status 2 and one ``prog: error:``
    line on stderr for bad input (:class:`TransquantError` or one of ``errors``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(usage(prog, schema, words, description))
        return 0
    try:
        return body(*parse(argv, schema, words is not None))
    except (TransquantError, *errors) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
