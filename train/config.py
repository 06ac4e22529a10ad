"""Run configuration: TOML files with includes, --set overrides, and validation that
reports every problem at once.

A config file may start with `include = "base.toml"` (a path relative to the file, or a
list of them): the included files are read first, in order, and this file's keys override
theirs. TOML has no null, so `model.window = 0`, `model.d_ff = 0` and
`model.vocab_size = 0` mean "none" / "automatic", here and in every checkpoint's config.json
(model/config.py: ModelConfig.to_dict and from_dict own that spelling).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from posleak.data import DataConfig
from posleak.data.batches import SOURCE_PARAMS
from posleak.model import ConfigError, ModelConfig
from posleak.model.config import MOVED, upgraded
from posleak.model.positions import SCHEMES

MAX_BATCH = 1 << 16  # sequences per step: beyond this a typo, not a plan
MAX_SEED = 1 << 63  # torch.manual_seed takes a signed 64-bit integer
MAX_THREADS = 1 << 10  # torch threads of one process: beyond this a typo
MAX_INCLUDE_DEPTH = 32
DERIVED = (  # config.toml's informational [derived] table, written by train/loop.py
    "ff_width",  # the SwiGLU width as built (model.d_ff = 0: 8/3 d_model rounded up to 32)
    "rope_effective_base",
    "precision",
    "n_params",
    "n_params_non_embedding",
    "tokens_per_step",
    "world_size",
)
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 16  # global: split evenly across distributed ranks
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup: int = 50
    decay_start: int = 0  # the cosine decay starts here (constant lr before; 0: after warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    ckpt_initial: bool = False  # also checkpoint the initial weights (step 0): the step-0 analysis
    log_every: int = 10
    precision: str = "auto"
    device: str = "auto"
    compile: bool | str = False  # true, false, or "auto" (train/environment.py)
    threads: int = 0  # torch intra-op threads; 0 = torch's default (or $OMP_NUM_THREADS)


@dataclass(frozen=True)
class LogConfig:
    progress: bool = True  # tqdm bar when stderr is a terminal
    wandb: bool = False
    wandb_project: str = "posleak"


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "log": LogConfig,
}


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    model: dict = field(default_factory=dict)  # [model] as spelled on disk; model_config()
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model this run builds, its vocabulary (0: from the data) filled in: the only
        place a run's ModelConfig is made (ModelConfig.from_dict reads the disk spelling)."""
        return ModelConfig.from_dict(self.model_values(vocab_size))

    def model_values(self, vocab_size: int) -> dict:
        """[model] with the vocabulary filled in, still as spelled on disk."""
        values = dict(self.model)
        if not values.get("vocab_size"):
            values["vocab_size"] = vocab_size
        elif values["vocab_size"] < vocab_size:
            raise ConfigError(
                f"model.vocab_size={values['vocab_size']} is smaller than the data's vocabulary "
                f"({vocab_size}); set model.vocab_size = 0 to take it from the data"
            )
        return values

    def to_dict(self) -> dict:
        """As written to config.toml: the data's parameters those of its source (built)."""
        out = {"seed": self.seed, "model": dict(self.model)}
        for name in ("data", "train", "log"):
            out[name] = dataclasses.asdict(getattr(self, name))
        out["data"] = dataclasses.asdict(self.data.built())
        if not out["data"]["params"]:  # a source without parameters writes no [data.params]
            del out["data"]["params"]
        return out


PARAMS = "model.params."  # a positional scheme's own parameters: model/positions.py
DATA_PARAMS = "data.params."  # a data source's own parameters: data/batches.py
DATA_MOVED = {  # DataConfig fields that became their source's [data.params]
    name for own in SOURCE_PARAMS.values() for name in own
}


def valid_keys() -> list[str]:
    keys = ["seed"]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls) if f.name != "params"]
    keys += sorted({PARAMS + p for scheme in SCHEMES.values() for p in scheme.params})
    return keys + sorted({DATA_PARAMS + p for p in DATA_MOVED})


def upgraded_data(values: dict) -> dict:
    """[data] as written before the sources' parameters moved into [data.params]."""
    moved = {k: v for k, v in values.items() if k in DATA_MOVED}
    if not moved:
        return values
    out = {k: v for k, v in values.items() if k not in DATA_MOVED}
    out["params"] = {**moved, **(values.get("params") or {})}
    return out


def _expected_type(section: str, name: str):
    hints = typing.get_type_hints(SECTIONS[section])
    return hints[name]


def _type_ok(value, expected) -> bool:
    options = typing.get_args(expected) or (expected,)
    for option in options:
        if option is type(None):
            continue
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option in (str, bool) and isinstance(value, option):
            return True
    return False


def _type_name(expected) -> str:
    options = [o for o in (typing.get_args(expected) or (expected,)) if o is not type(None)]
    return " or ".join(o.__name__ for o in options)


def flatten(values: dict, prefix: str = "") -> dict:
    """{"model": {"n_layer": 2}} -> {"model.n_layer": 2}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


PRESETS = Path(__file__).with_name("presets.toml")


@functools.cache
def presets() -> dict[str, dict]:
    """{name: flat keys} of every positional variant (train/presets.toml), read once."""
    return {name: flatten(keys) for name, keys in read_toml_file(PRESETS, "presets").items()}


def preset(name) -> dict:
    """The flat keys of one preset, or a ConfigError that lists the valid names."""
    known = presets()
    if not isinstance(name, str) or name not in known:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {sorted(known)}")
    return dict(known[name])


def read_toml(path: Path, seen: tuple = ()) -> dict:
    """Flat {dotted key: value} of a file and its includes: includes first, then the file's
    preset (train/presets.toml), then the file's own keys."""
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"include cycle: {' -> '.join(map(str, (*seen, path)))}")
    if len(seen) >= MAX_INCLUDE_DEPTH:
        raise ConfigError(
            f"{seen[0]}: includes nest deeper than {MAX_INCLUDE_DEPTH} files; flatten them"
        )
    raw = read_toml_file(path, "config file")
    _check_derived(path, raw.pop("derived", None))
    includes = raw.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(
            f"{path}: include must be a file name or a list of them, got {includes!r}"
        )
    merged: dict = {}
    for inc in includes:
        merged.update(read_toml(path.parent / inc, (*seen, path)))
    if "preset" in raw:
        merged.update(preset(raw.pop("preset")))
    merged.update(flatten(raw))
    return merged


def _check_derived(path: Path, derived) -> None:
    """A saved config.toml's [derived] table: informational, but it must be what we write."""
    if derived is None:
        return
    if not isinstance(derived, dict) or set(derived) - set(DERIVED):
        unknown = sorted(set(derived) - set(DERIVED)) if isinstance(derived, dict) else derived
        raise ConfigError(
            f"{path}: [derived] holds {unknown!r}; it may hold only {', '.join(DERIVED)} "
            "(values computed by training, ignored when read): remove the others"
        )


def read_toml_file(path: Path, what: str) -> dict:
    """A TOML file's contents, or a ConfigError that names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        problem = (
            "is a directory"
            if path.is_dir()
            else "is not a regular file"
            if path.exists()
            else "does not exist"
        )
        raise ConfigError(f"{what} {path} {problem}; give the path of a .toml file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is harmless
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text; give a .toml file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {path} is not valid TOML: {err}") from None


def parse_override(text: str) -> tuple[str, object]:
    """'train.lr=1e-3' -> ('train.lr', 0.001); values are TOML literals, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value


def build(values: dict) -> RunConfig:
    """RunConfig from flat dotted values; every problem is collected and raised together."""
    seed, sections, problems = _sort_keys(values)
    data = DataConfig(**sections["data"])
    train = TrainConfig(**sections["train"])
    log = LogConfig(**sections["log"])
    problems += data.problems() + train_problems(train)
    run = RunConfig(seed=seed, model=sections["model"], data=data, train=train, log=log)
    # the data's vocabulary is known only once the corpus is loaded: checked at run time
    values = run.model_values(vocab_size=1)
    model_problems = ModelConfig.problems_of(values)
    problems += [f"model: {p}" for p in model_problems]
    if not model_problems:
        model = ModelConfig.from_dict(values)
        limit = model.scheme.max_len(model)
        if limit is not None and limit < data.seq_len:
            problems.append(
                f"model.max_seq_len={limit} is shorter than data.seq_len={data.seq_len}: the "
                f"{model.position} position table cannot cover the sequence; raise "
                "model.max_seq_len"
            )
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return run


def _sort_keys(values: dict) -> tuple[int, dict, list[str]]:
    """The seed, {section: {name: value}} and the problems of unknown or mistyped keys."""
    problems = []
    keys = valid_keys()
    sections: dict[str, dict] = {name: {} for name in SECTIONS}
    seed = 0
    unknown = False
    for key, value in values.items():
        if key in SECTIONS:  # a section given a value ([[train]], --set model=3)
            what = "an array of tables ([[...]])" if isinstance(value, list) else repr(value)
            problems.append(
                f"{key!r} is a section, not a key, and was given {what}: set its keys one by "
                f"one ([{key}] then name = value, or --set {key}.NAME=VALUE)"
            )
            continue
        if key.startswith(PARAMS) and "." not in key[len(PARAMS) :]:
            sections["model"].setdefault("params", {})[key[len(PARAMS) :]] = value
            continue  # checked by the scheme it belongs to (ModelConfig.problems)
        if key.startswith(DATA_PARAMS) and "." not in key[len(DATA_PARAMS) :]:
            sections["data"].setdefault("params", {})[key[len(DATA_PARAMS) :]] = value
            continue  # checked against the sources' declarations (DataConfig.problems)
        if key.startswith("data.") and key[len("data.") :] in DATA_MOVED:
            problems.append(f"{key} is now data.params.{key[len('data.') :]} (a parameter of "
                            "its source): write it there")  # fmt: skip
            continue
        if key.startswith("model.") and key[len("model.") :] in MOVED:
            problems.append(
                f"{key} is now model.params.{MOVED[key[len('model.') :]]} (a parameter of the "
                "RoPE schemes): write it there"
            )
            continue
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
            unknown = True
            continue
        section, _, name = key.rpartition(".")
        expected = int if key == "seed" else _expected_type(section, name)
        if not _type_ok(value, expected):
            problems.append(
                f"{key}: expected {_type_name(expected)}, got {type(value).__name__} {value!r}"
            )
        elif key == "seed":
            seed = value
            if not 0 <= seed < MAX_SEED:
                problems.append(f"seed must be in [0, 2^63), got {seed}")
        else:
            sections[section][name] = value
    if unknown:
        problems.append(f"valid keys: {', '.join(keys)}")
    return seed, sections, problems


def train_problems(t: TrainConfig) -> list[str]:
    """Values that have the right type but make no sense, each with the accepted range."""
    out = []
    for name in ("steps", "batch_size", "eval_every", "eval_batches", "ckpt_every", "log_every"):
        if getattr(t, name) < 1:
            out.append(f"train.{name} must be >= 1, got {getattr(t, name)}")
    checks = (
        ("keep_checkpoints", t.keep_checkpoints >= 1, ">= 1"),
        ("warmup", t.warmup >= 0, ">= 0"),
        ("decay_start", t.decay_start >= 0, ">= 0 (0: the decay starts after the warm-up)"),
        ("lr", math.isfinite(t.lr) and t.lr > 0, "a finite number > 0"),
        ("min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "in [0, 1] (the cosine floor as a share of lr)"),
        ("weight_decay", math.isfinite(t.weight_decay) and t.weight_decay >= 0, "finite and >= 0"),
        ("beta1", 0 <= t.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= t.beta2 < 1, "in [0, 1)"),
        ("grad_clip", math.isfinite(t.grad_clip) and t.grad_clip >= 0, "finite and >= 0 (0 = off)"),
        ("threads", 0 <= t.threads <= MAX_THREADS, f"in [0, {MAX_THREADS}] (0 = torch's default)"),
        ("batch_size", t.batch_size <= MAX_BATCH, f"at most {MAX_BATCH}"),
    )
    out += [
        f"train.{name} must be {rule}, got {getattr(t, name)!r}"
        for name, ok, rule in checks
        if not ok
    ]
    if t.precision not in PRECISIONS:
        out.append(f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
    if t.device not in DEVICES:
        out.append(f"train.device must be one of {DEVICES}, got {t.device!r}")
    if isinstance(t.compile, str) and t.compile != "auto":
        out.append(f'train.compile must be true, false or "auto", got {t.compile!r}')
    return out


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a config file (or only defaults), apply `key=value` overrides and validate.
    `--set preset=NAME` applies a preset's keys under the other overrides."""
    values = read_toml(Path(path)) if path else {}
    pairs = [parse_override(o) for o in overrides]
    for key, value in pairs:
        if key == "preset":
            values.update(preset(value))
    values.update({key: value for key, value in pairs if key != "preset"})
    return build(values)


def to_toml(cfg: RunConfig, model_cfg: ModelConfig | None = None, derived: dict | None = None):
    """The resolved config: every key with its value, the model's as built."""
    out = cfg.to_dict()
    if model_cfg is not None:
        out["model"] = model_cfg.to_dict()
    if derived:
        out["derived"] = derived
    return tomli_w.dumps(_drop_none(out))


def from_resolved(path: Path) -> RunConfig:
    """Read a run directory's resolved config.toml (its [derived] table is informational)."""
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    _check_derived(Path(path), raw.pop("derived", None))
    if isinstance(raw.get("model"), dict):  # written before RoPE's parameters moved
        raw["model"] = upgraded(raw["model"])
    if isinstance(raw.get("data"), dict):  # ... or before the sources' parameters did
        raw["data"] = upgraded_data(raw["data"])
    return build(flatten(raw))


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
