"""Step 2: a RoBERTa or GPT-2 config.json, from a published base, a tokenizer and overrides.

    flax-lm create-config --model_type gpt2 --tokenizer_name tok/ \\
        --config_overrides "n_embd=256,n_head=4,n_layer=4" --dropout 0 --output_dir tok/

Token ids come from the tokenizer. RoBERTa takes its bos/eos/pad ids (pad also sets where
position ids start). GPT-2 uses one id for bos and eos, as OpenAI's GPT-2 does with
<|endoftext|>: the tokenizer's eos `</s>`, which marks document boundaries in the training
stream, so generating from it starts a new document. GPT-2 also gets the tokenizer's pad id,
which its forward pass ignores and batched generation uses to fill finished rows.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path

from transformers import GPT2Config, PretrainedConfig, RobertaConfig

from flax_lm.errors import UserError, damaged, one_line

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {"gpt2": GPT2Config, "roberta": RobertaConfig}
DEFAULT_BASES = {"gpt2": "gpt2", "roberta": "roberta-base"}
DROPOUT_FIELDS = {
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"),
    "roberta": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
}
# Sizes every supported config has (GPT-2 maps these names to n_embd, n_layer, ...).
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
NOT_OVERRIDABLE = {"model_type", "transformers_version", "_name_or_path", "architectures"}
TRUE_WORDS = ("true", "1", "yes", "y")
FALSE_WORDS = ("false", "0", "no", "n")
NONE_WORDS = ("none", "null")


def base_config_names() -> list[str]:
    return sorted(path.stem for path in CONFIGS_DIR.glob("*.json"))


def load_base_config(name_or_path: str, model_type: str | None = None) -> PretrainedConfig:
    """A config from a JSON in configs/ by name ("gpt2", "roberta-base") or a config.json/dir path.

    `model_type`, when given, must match the config's.
    """
    path = _config_path(name_or_path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(path, err) from None
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err}") from None
    found_type = values.get("model_type") if isinstance(values, dict) else None
    if found_type not in CONFIG_CLASSES:
        raise UserError(
            f"config {path} has model_type {found_type!r}; supported: {', '.join(CONFIG_CLASSES)}"
        )
    if model_type is not None and model_type != found_type:
        raise UserError(f"--model_type {model_type} does not match {path} (a {found_type} config)")
    return CONFIG_CLASSES[found_type].from_dict(values)


def _config_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"directory {path} has no config.json")
        return path / "config.json"
    if path.is_file():
        return path
    named = CONFIGS_DIR / f"{name_or_path}.json"
    if "/" not in name_or_path and named.is_file():
        return named
    raise UserError(
        f"no config {name_or_path!r}: not a file or directory, nor one of "
        f"{', '.join(base_config_names())} (in {CONFIGS_DIR})"
    )


def overridable_keys(config: PretrainedConfig) -> list[str]:
    keys = set(config.to_dict()) | set(config.attribute_map)
    return sorted(keys - NOT_OVERRIDABLE)


def apply_config_overrides(config: PretrainedConfig, overrides: str) -> PretrainedConfig:
    """Apply "key=value,key=value" (the HF --config_overrides syntax) in place, typed per field.

    Values are parsed as the config class annotates the field (int, float, bool, str, None),
    or as the current value's type where there is no annotation.
    """
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        key, sep, text = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise UserError(f"config override {item!r} is not key=value")
        if key not in overridable_keys(config):
            close = difflib.get_close_matches(key, overridable_keys(config), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown {config.model_type} config key {key!r}{hint}")
        field = config.attribute_map.get(key, key)
        setattr(config, field, _parse_value(key, text, _field_types(config, field)))
    return config


def _annotations(config_class: type) -> dict[str, object]:
    """Field annotations of the config class and its bases that are real types, not strings."""
    found: dict[str, object] = {}
    for cls in reversed(config_class.__mro__):
        annotations = vars(cls).get("__annotations__", {})
        found.update({k: v for k, v in annotations.items() if not isinstance(v, str)})
    return found


def _field_types(config: PretrainedConfig, field: str) -> tuple[type, ...]:
    annotation = _annotations(type(config)).get(field)
    if annotation is None:
        current = getattr(config, field, None)
        return (int, float, bool, str, type(None)) if current is None else (type(current),)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _parse_value(key: str, text: str, allowed: tuple[type, ...]) -> object:
    """The first reading of `text` that one of the allowed types accepts."""
    word = text.lower()
    if type(None) in allowed and word in NONE_WORDS:
        return None
    if bool in allowed and word in TRUE_WORDS + FALSE_WORDS:
        return word in TRUE_WORDS
    for kind in (kind for kind in allowed if kind in (int, float)):  # in annotation order
        try:
            return kind(text)
        except ValueError:
            pass
    if str in allowed:
        return text
    names = " or ".join(getattr(kind, "__name__", str(kind)) for kind in allowed)
    raise UserError(f"config override {key}={text!r}: expected {names}")


def set_dropout(config: PretrainedConfig, p: float) -> PretrainedConfig:
    """Set every dropout probability of the model type to `p` (RoBERTa's classifier_dropout stays)."""
    if not 0.0 <= p < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {p}")
    for field in DROPOUT_FIELDS[config.model_type]:
        setattr(config, field, p)
    return config


def set_token_ids(config: PretrainedConfig, tokenizer_dir: str) -> PretrainedConfig:
    """Vocabulary size and special-token ids from a saved tokenizer (see the module docstring)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    if config.model_type == "gpt2":
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    else:
        if tokenizer.pad_token_id is None:
            raise UserError(f"tokenizer {tokenizer_dir} has no pad token; RoBERTa needs one")
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(
    name: str, *, cache_dir: str | None = None, token: str | None = None,
    revision: str | None = None,
):
    """A fast tokenizer from a local directory (train-tokenizer's, or a model's) or, for a name
    that can only be one, a Hub repo id (at `revision`, downloaded into `cache_dir`, with `token`
    for gated or private repos). Each failure is one UserError naming `name`; a directory whose
    JSON does not parse names that file as damaged."""
    from transformers import AutoTokenizer  # slow import: only when loading

    from flax_lm.hub_models import is_hub_id

    path = Path(name).expanduser()
    if path.is_dir() and not any((path / file).is_file() for file in TOKENIZER_FILES):
        raise cannot_load_tokenizer(
            name, f"no tokenizer in {path} (no {' or '.join(TOKENIZER_FILES)}): "
            "give --tokenizer_name"
        )
    if not path.is_dir() and not is_hub_id(name):
        reason = "not a directory" if path.exists() else "no such directory, nor a Hub repo id"
        raise cannot_load_tokenizer(name, reason)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, cache_dir=cache_dir, token=token, revision=revision
        )
    except (OSError, ValueError) as err:
        damaged = damaged_file(path) if path.is_dir() else None
        raise damaged or cannot_load_tokenizer(name, one_line(err)) from None
    for option in LOADING_OPTIONS:  # saved back, they would change the folder it came from
        tokenizer.init_kwargs.pop(option, None)
    return tokenizer


# How transformers found a tokenizer, which it keeps among the tokenizer's settings.
LOADING_OPTIONS = ("is_local", "local_files_only")


def cannot_load_tokenizer(name: str, reason: str) -> UserError:
    return UserError(f"cannot load the tokenizer {name!r}: {reason}")


# What transformers reads from a model or tokenizer dir as JSON.
JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.json", "model.safetensors.index.json")  # fmt: skip


def damaged_file(directory: str | Path) -> UserError | None:
    """The error naming a JSON file of `directory` that does not parse (as an interrupted copy
    or download leaves it), if there is one."""
    for name in JSON_FILES:
        path = Path(directory) / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                return damaged(path, err)
    return None


def check_config(config: PretrainedConfig, tokenizer_size: int | None = None) -> None:
    """Catch sizes the model cannot be built with, before anything is written."""
    for field in SIZE_FIELDS:
        value = getattr(config, field)
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"config {field} must be a positive integer, got {value!r}")
    width, heads = config.hidden_size, config.num_attention_heads
    if width % heads:  # the rule of the models' check_heads, told before anything is written
        raise UserError(f"hidden size {width} is not divisible by {heads} attention heads")
    for field in DROPOUT_FIELDS[config.model_type]:
        value = getattr(config, field)
        if not 0.0 <= value < 1.0:
            raise UserError(f"config {field} must be in [0, 1), got {value}")
    if tokenizer_size is not None and config.vocab_size < tokenizer_size:
        raise UserError(
            f"vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer_size} tokens"
        )


def build_config(
    model_type: str | None = None,
    base: str | None = None,
    tokenizer_dir: str | None = None,
    dropout: float | None = None,
    overrides: str | None = None,
) -> PretrainedConfig:
    """Base config -> tokenizer's vocab and ids -> dropout -> overrides (the user's last word)."""
    if model_type is None and base is None:
        raise UserError("give --model_type (roberta or gpt2) or --base")
    if model_type is not None and model_type not in CONFIG_CLASSES:
        raise UserError(
            f"unknown model_type {model_type!r}; supported: {', '.join(CONFIG_CLASSES)}"
        )
    config = load_base_config(base or DEFAULT_BASES[model_type], model_type)
    tokenizer_size = None
    if tokenizer_dir is not None:
        set_token_ids(config, tokenizer_dir)
        tokenizer_size = config.vocab_size
    if dropout is not None:
        set_dropout(config, dropout)
    if overrides:
        apply_config_overrides(config, overrides)
    check_config(config, tokenizer_size)
    return config


def describe(config: PretrainedConfig) -> str:
    return (
        f"{config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads, vocab {config.vocab_size}, "
        f"{config.max_position_embeddings} positions"
    )
