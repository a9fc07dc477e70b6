"""Loading the model to study: a packaged offline model, a hub id, a local directory, or a
small random model of any family built in-process (``model_type`` + ``random_config``).

Every loader also returns an *identity* — what the fine-tune cache key hashes — so that two
different sets of starting weights can never share a cached checkpoint.

A hub model may declare ``model_type`` and ``architecture`` (the config values that shape its
module tree): config validation then builds its skeleton offline, and loading checks the
downloaded config agrees.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

from ..core.progress import transformers_bars_off
from .adapters import ADAPTERS, Adapter, adapter_for
from .adapters.base import SEGMENT_INPUT

DEFAULT_MODEL_TYPE = "bert"  # a random_config without model_type (model=tiny)


class ModelError(ValueError):
    """The model named in the config cannot be loaded as a sequence classifier."""


def resolve_source(cfg) -> tuple[str, str]:
    """(kind, location): kind is ``local``, ``hub``, ``package`` or ``random``."""
    if cfg.name_or_path:
        loc = str(cfg.name_or_path)
        if Path(loc).expanduser().exists():
            return "local", str(Path(loc).expanduser().resolve())
        if loc.startswith(("/", ".", "~")) or loc.count("/") > 1:
            raise ModelError(f"model.name_or_path={loc}: directory does not exist "
                             "(give an existing local checkpoint directory or a hub id like 'bert-base-uncased')")
        return "hub", loc
    if cfg.get("package"):
        try:
            mod = importlib.import_module(cfg.package)
        except ImportError as err:
            raise ModelError(f"model.package={cfg.package} is not installed ({err}); "
                             "pip install the project as the README says") from err
        return "package", str(mod.get_model_path())
    if cfg.get("random_config"):
        return "random", "random"
    raise ModelError(f"model {cfg.name}: set one of model.name_or_path, model.package, model.random_config")


def check_local_checkpoint(path: str) -> None:
    """Fail fast (before any training) on a directory that is not an encoder checkpoint."""
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"model.name_or_path={path}: not a directory")
    if not (p / "config.json").is_file():
        raise ModelError(f"model.name_or_path={path}: no config.json (not a Hugging Face checkpoint)")
    try:
        conf = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"model.name_or_path={path}: config.json is not valid JSON ({err})") from err
    if not conf.get("model_type"):
        raise ModelError(f"model.name_or_path={path}: config.json has no model_type")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ModelError(f"model.name_or_path={path}: no weights (*.safetensors or *.bin)")


def identity(cfg) -> dict:
    """What makes the starting weights what they are (hashed into the fine-tune cache key)."""
    kind, loc = resolve_source(cfg)
    if kind == "package":
        return {"kind": kind, "package": cfg.package,
                "version": importlib.metadata.version(cfg.package.replace("_", "-"))}
    if kind == "local":
        h = hashlib.sha256()
        for f in sorted(Path(loc).iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin", ".txt"):
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
        return {"kind": kind, "sha256": h.hexdigest()}
    if kind == "hub":
        return {"kind": kind, "id": loc, "revision": cfg.get("revision") or "main"}
    return {"kind": kind, "model_type": model_type(cfg), "config": dict(cfg.random_config), "tokenizer": cfg.tokenizer}


def load_tokenizer(cfg):
    """The model's tokenizer, with a pad token: decoders (GPT-2, …) ship without one, and both the
    padded batches and their classification head (which pools the last non-pad token) need it.

    It returns exactly the inputs the model's family takes: no ``token_type_ids`` for a family
    without segment embeddings (:attr:`~.adapters.base.Layout.segments`), even where the tokenizer
    is borrowed from one that has them (the tiny decoders use MiniLM's). Every batch is encoded
    by it, so such a model is never fed token types (GPT-2 would add them as *word* embeddings)."""
    tokenizer = _padded_tokenizer(cfg)
    if not family_adapter(cfg).segments:
        tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != SEGMENT_INPUT]
    return tokenizer


def _padded_tokenizer(cfg):
    kind, loc = resolve_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_location(cfg, kind, loc))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model {cfg.name}: the tokenizer has neither a pad nor an end-of-sequence token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def family_adapter(cfg) -> Adapter:
    """The site adapter of the model ``cfg`` names, from its module tree on the meta device (no
    weights are loaded or allocated)."""
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(model_config(cfg))
        return adapter_for(model)
    except ValueError as err:  # no sequence-classification head, or no adapter (ArchitectureError)
        raise ModelError(f"model {cfg.name}: {str(err).splitlines()[0]}") from err


def _tokenizer_location(cfg, kind: str, loc: str) -> str:
    if kind != "random":
        return loc
    mod = importlib.import_module(cfg.tokenizer)
    return str(mod.get_model_path())


def model_type(cfg) -> str:
    """The transformers model type of a random or declared-architecture model."""
    return str(cfg.get("model_type") or DEFAULT_MODEL_TYPE)


def model_config(cfg, num_labels: int = 2, pad_token_id: int | None = None) -> PretrainedConfig:
    """The model's transformers config, without loading weights: built from ``random_config``
    or a hub model's declared ``architecture`` (offline), else read from the checkpoint."""
    kind, loc = resolve_source(cfg)
    values = cfg.get("random_config") if kind == "random" else cfg.get("architecture") if kind == "hub" else None
    extra = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
    if kind == "hub" and values and not cfg.get("model_type"):
        raise ModelError(f"model {cfg.name}: model.architecture needs model.model_type (e.g. gpt2, opt, roberta)")
    if values:
        try:
            return AutoConfig.for_model(model_type(cfg), **dict(values), num_labels=num_labels, **extra)
        except ValueError as err:
            raise ModelError(f"model.model_type={model_type(cfg)}: transformers {transformers.__version__} has no "
                             f"such model type; the families with site adapters are {', '.join(ADAPTERS)} "
                             "(BERT-like types such as roberta and electra map to bert)") from err
    if kind == "local":
        check_local_checkpoint(loc)
    return AutoConfig.from_pretrained(loc, num_labels=num_labels, **extra)


def load_pretrained(cfg, num_labels: int, seed: int, pad_token_id: int | None = None) -> torch.nn.Module:
    """The starting model for fine-tuning, with a fresh classification head. A random model
    pads with its tokenizer's pad id; a checkpoint without one (GPT-2) gets the tokenizer's.
    ``pad_token_id``: that id, where the caller holds the tokenizer already (else the tokenizer
    is loaded here, at most once)."""
    kind, loc = resolve_source(cfg)
    pad_id = lambda: pad_token_id if pad_token_id is not None else _padded_tokenizer(cfg).pad_token_id
    if kind == "random":
        conf = model_config(cfg, num_labels, pad_token_id=pad_id())
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(conf)
    if kind == "local":
        check_local_checkpoint(loc)
    torch.manual_seed(seed)
    try:
        model, info = _quiet_classifier(loc, num_labels=num_labels)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"model {loc}: cannot load as a sequence classifier: {str(err).splitlines()[0]}") from err
    print(load_summary(cfg.name, info), flush=True)
    _check_architecture(cfg, model.config)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id()
    return model


def _classifier(location: str, **kwargs):
    """``from_pretrained`` of a sequence classifier, without its "Loading weights" bar."""
    with transformers_bars_off():
        return AutoModelForSequenceClassification.from_pretrained(location, **kwargs)


def _quiet_classifier(location: str, **kwargs):
    """(model, loading info) of :func:`_classifier` without transformers' multi-line, coloured
    load report: the caller says in one line what it means for this load."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return _classifier(location, output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)


def load_summary(name: str, info: dict) -> str:
    """One line for a log: which weights the checkpoint lacked (the new head, trained by the
    fine-tune) and which of its weights the classifier does not use (e.g. a pretraining head)."""
    new, unused = sorted(map(str, info.get("missing_keys", ()))), sorted(map(str, info.get("unexpected_keys", ())))
    parts = [f"model {name}: loaded"]
    if new:
        parts.append(f"new (fine-tuned from scratch): {', '.join(new[:4])}{' …' if len(new) > 4 else ''}")
    if unused:
        parts.append(f"unused checkpoint weights: {len(unused)} ({unused[0]} …)")
    return "; ".join(parts)


def _check_architecture(cfg, conf: PretrainedConfig) -> None:
    """A declared architecture (what validation checked the config against) must be the checkpoint's."""
    if not cfg.get("architecture"):
        return
    declared = {"model_type": model_type(cfg), **dict(cfg.architecture)}
    wrong = [f"{k}={v} (checkpoint: {getattr(conf, k, None)})" for k, v in declared.items() if getattr(conf, k, None) != v]
    if wrong:
        raise ModelError(f"model {cfg.name}: model.model_type/architecture disagree with the checkpoint's config: "
                         f"{', '.join(wrong)}; fix conf/model/{cfg.name}.yaml")


def load_finetuned(path: str | Path) -> torch.nn.Module:
    """A fine-tuned checkpoint, with the attention variant its config records (clipped softmax,
    gated heads: :mod:`transquant.train.attention`) installed and its gates loaded; a plain
    softmax checkpoint loads as it always did."""
    from ..train import attention  # here: it imports quant.sites, which imports this package

    if not attention.gated_checkpoint(path):
        model = _classifier(str(path))
        return attention.install(model)  # a no-op for plain softmax
    # The stock classes have no gates: their weights are "unexpected" to from_pretrained, are
    # checked to be the only surprise, and are loaded after install().
    model, info = _quiet_classifier(str(path))
    wrong = [*info.get("missing_keys", ()), *info.get("mismatched_keys", ()),
             *(k for k in info.get("unexpected_keys", ()) if f".{attention.GATE}." not in k)]
    if wrong:
        raise ModelError(f"checkpoint {path}: weights do not match the model: {sorted(map(str, wrong))[:3]}")
    attention.install(model)
    attention.load_gates(model, path)
    return model


def hidden_size(cfg) -> int:
    """Width of the residual stream, known before loading weights (for config validation)."""
    return int(model_config(cfg).hidden_size)
