"""Adapter files (LoRA, DoRA, IA3, prompt and prefix tuning): the PEFT format, validated
before anything uses them.

An adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`, as PEFT
saves it. Loading refuses, each with a message naming the problem: a path outside the
configured adapter roots (a file linked to from outside them too), pickled weights
(`.bin`/`.pt`: never unpickled), a missing or unreadable safetensors file, a rank above
the limit, target modules the engine does not serve, shapes or dtypes that do not fit the
base model (read from the file's header, before any tensor), and non-finite values.
"""

import hashlib
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorag.errors import AdapterChanged, InvalidRequest

# The projections of a Llama-family decoder layer that adapters may target.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PICKLED_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
_MLP = ("gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
                  r"(?:lora_([AB])\.weight|lora_(magnitude)_vector|(ia3)_l)$")
# IA3 may scale a projection's input (PEFT's feedforward_modules) only where the engine
# runs the projection alone: q, k and v share one fused matmul, hence one input
IA3_INPUT_MODULES = ("o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BaseShape:
    """What an adapter must fit: the base model's architecture and projection shapes."""

    model_type: str
    num_layers: int
    shapes: dict[str, tuple[int, int]]  # module -> (in_features, out_features)

    @classmethod
    def from_config(cls, config) -> "BaseShape":
        """Read the shapes from a transformers Llama-style config."""
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q_out = config.num_attention_heads * head_dim
        kv_out = config.num_key_value_heads * head_dim
        shapes = {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out),
                  "v_proj": (hidden, kv_out), "o_proj": (q_out, hidden),
                  "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                  "down_proj": (inter, hidden)}
        return cls(config.model_type, config.num_hidden_layers, shapes)


MAX_COMPOSITION = 8  # adapters in one weighted composition
# |weight| of one adapter in a composition: enough to amplify, negate or blend adapters;
# a huge one scales B past float range (inf, then NaN, in every row that uses it)
MAX_COMPOSITION_WEIGHT = 10.0


@dataclass(frozen=True)
class Composition:
    """A weighted sum of adapters served as one: `parts` is ((name, weight), ...).

    Hashable, so the engine keys an adapter slot by it exactly as by a plain name; `str()`
    is how it reads in stats and metrics ("a*0.5+b*0.5"). Checked once, here.
    """

    parts: tuple[tuple[str, float], ...]

    def __post_init__(self):
        if not 1 <= len(self.parts) <= MAX_COMPOSITION:
            raise InvalidRequest(f"a composition takes 1-{MAX_COMPOSITION} adapters, got "
                                 f"{len(self.parts)}", field="adapters")
        for name, weight in self.parts:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not math.isfinite(weight) or abs(weight) > MAX_COMPOSITION_WEIGHT:
                raise InvalidRequest(f"weight of adapter {name!r} must be a number in "
                                     f"[-{MAX_COMPOSITION_WEIGHT:g}, {MAX_COMPOSITION_WEIGHT:g}]"
                                     f", got {weight!r}", field="adapters")

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters it is made of."""
        return tuple(name for name, _ in self.parts)

    def simplest(self) -> "AdapterKey":
        """What it serves as: one adapter at weight 1 is that adapter (and shares its
        slot), anything else itself."""
        if len(self.parts) == 1 and self.parts[0][1] == 1:
            return self.parts[0][0]
        return self

    def __str__(self) -> str:
        return "+".join(f"{name}*{weight:g}" for name, weight in self.parts)


AdapterKey = str | Composition  # what the engine serves a request with


@dataclass(frozen=True)
class VirtualTokens:
    """The learnt virtual tokens of a prompt- or prefix-tuning adapter (PEFT's
    `prompt_embeddings`), which stand before the prompt of every request on it.

    prompt: `tensor` is [count, hidden], input embeddings run through the model in place
    of `count` tokens at positions 0..count-1. prefix: `tensor` is [layers, 2, count,
    kv_out], every layer's keys and values for those positions, put in the KV cache as
    they are (no projection, no rotary: PEFT passes them as past_key_values).
    """

    kind: str  # prompt | prefix
    tensor: torch.Tensor

    @property
    def count(self) -> int:
        """How many positions they take before the prompt."""
        return self.tensor.shape[0] if self.kind == "prompt" else self.tensor.shape[2]


@dataclass
class LoraWeights:
    """A validated adapter in memory, its scaling folded into B.

    `a[(layer, module)]`: [rank, in_features]; `b[(layer, module)]`: [out_features, rank],
    already multiplied by the scaling (alpha / r, or alpha / sqrt(r) for rsLoRA), so
    `delta_y = b @ (a @ x)` with no further factor. Composition relies on that.
    `magnitude[(layer, module)]`: [out_features], a DoRA adapter's learnt column norms
    (empty for LoRA): the projection serves `m / ||W + b a||_row * (W + b a) x`.
    An IA3 adapter has no a or b (rank 0): `ia3[(layer, module)]` is its learnt vector,
    [out_features] scaling the projection's output (bias included, as PEFT does), or for
    the modules in `ia3_inputs` (PEFT's feedforward_modules) [in_features] scaling its
    input: `W (l * x)`.
    A prompt- or prefix-tuning adapter has no per-projection tensors either: `virtual`
    holds its learnt virtual tokens.
    """

    name: AdapterKey
    rank: int
    a: dict[tuple[int, str], torch.Tensor]
    b: dict[tuple[int, str], torch.Tensor]
    target_modules: frozenset[str] = field(default_factory=frozenset)
    magnitude: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    ia3: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    ia3_inputs: frozenset[str] = field(default_factory=frozenset)
    # prompt / prefix tuning: the learnt virtual tokens that start every request on it
    virtual: VirtualTokens | None = None
    # a digest of the served tensors: what the KV prefix cache keys the adapter by, never
    # the name (a name re-registered with other weights must not hit the old entries)
    version: str = ""

    def __post_init__(self):
        if not self.version:
            virtual = {} if self.virtual is None else {(0, self.virtual.kind):
                                                       self.virtual.tensor}
            self.version = weights_digest(self.a, self.b, self.magnitude, self.ia3, virtual)

    @property
    def dora(self) -> bool:
        """Whether this is a DoRA adapter (a magnitude per projection)."""
        return bool(self.magnitude)

    @property
    def kind(self) -> str:
        """lora, dora, ia3, prompt or prefix: what /v1/models and `lorag adapters list`
        show."""
        if self.virtual is not None:
            return self.virtual.kind
        return "ia3" if self.ia3 else "dora" if self.magnitude else "lora"

    @property
    def nbytes(self) -> int:
        """Bytes held in RAM by this adapter's tensors."""
        tensors = (*self.a.values(), *self.b.values(), *self.magnitude.values(),
                   *self.ia3.values(), *([] if self.virtual is None else [self.virtual.tensor]))
        return sum(t.numel() * t.element_size() for t in tensors)


def weights_digest(a: dict, b: dict, magnitude: dict | None = None,
                   ia3: dict | None = None, virtual: dict | None = None) -> str:
    """A digest of an adapter's tensors (keys, dtypes, shapes and bytes): equal exactly
    when the served weights are equal."""
    digest = hashlib.blake2b(digest_size=16)
    for tensors in (a, b, magnitude or {}, ia3 or {}, virtual or {}):
        for key in sorted(tensors):
            tensor = tensors[key].detach().contiguous().cpu()
            digest.update(f"{key}{tensor.dtype}{list(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def confine(path: str | Path, roots: list[Path]) -> Path:
    """Resolve `path` (following symlinks and `..`) and refuse it unless inside a root."""
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(root.expanduser().resolve()) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "(none configured)"
        raise InvalidRequest(
            f"adapter path {path} is outside the configured adapter roots ({allowed})",
            field="path")
    return resolved


def content_version(path: str | Path, roots: list[Path]) -> str:
    """The sha256 of an adapter's config and weights files: what a registration records,
    so every replica can tell the weights it holds under a name from newer ones, and a
    re-read can tell files rewritten since from the registered ones."""
    folder = confine(path, roots)
    digests = []
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        try:
            with open(confine(folder / name, roots), "rb") as file:
                digests.append(hashlib.file_digest(file, "sha256").digest())
        except OSError as e:
            raise InvalidRequest(f"adapter path {path} has no readable {name}",
                                 field="path") from e
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _version(config: bytes, weights: bytes) -> str:
    """content_version of files already read: the same digest, of these very bytes."""
    return hashlib.sha256(hashlib.sha256(config).digest()
                          + hashlib.sha256(weights).digest()).hexdigest()


def _read(path: Path, roots: list[Path], limit: int, what: str) -> bytes:
    """A file's bytes with ordinary reads (a file truncated meanwhile reads short, where a
    memory map would crash the process), at most `limit` of them."""
    try:
        with open(confine(path, roots), "rb") as file:
            data = file.read(limit + 1)
    except OSError as e:
        raise InvalidRequest(f"{path} is not readable: {e.strerror}", field="path") from e
    if len(data) > limit:
        raise InvalidRequest(f"{path} is over {limit} bytes, more than {what}",
                             field="path")
    return data


def read_config(folder: Path, max_rank: int, roots: list[Path]) -> tuple[dict, bytes]:
    """Read and check `adapter_config.json` (which must resolve inside `roots`, like the
    folder); returns it as a dict, and the bytes it was read from."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        whole = " (it holds a complete model, as `lorag train --method full / freeze` " \
            "writes: serve it with `lorag serve --model`)" \
            if (folder / "config.json").is_file() else ""
        raise InvalidRequest(f"{folder} has no adapter_config.json{whole}", field="path")
    raw = _read(path, roots, MAX_CONFIG_BYTES, "an adapter config needs")
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{path} is not valid JSON: {e}", field="path") from e
    kind = config.get("peft_type", "LORA")
    if kind == "IA3":
        return _check_ia3_config(config, path), raw
    if kind in VIRTUAL_KINDS:
        return _check_virtual_config(config, path), raw
    checks = [
        (kind == "LORA", f"peft_type is {kind!r}; LORA (LoRA, DoRA), IA3, PROMPT_TUNING and "
                         "PREFIX_TUNING adapters are served"),
        (isinstance(config.get("r"), int) and 0 < config["r"] <= max_rank,
         f"rank r={config.get('r')!r} is outside 1..{max_rank} (the engine's max_lora_rank)"),
        (config.get("bias", "none") == "none", "adapters that train biases are not served"),
        (not config.get("modules_to_save"), "adapters with modules_to_save are not served"),
        (not config.get("fan_in_fan_out") and not config.get("lora_bias")
         and not config.get("layer_replication") and not config.get("target_parameters"),
         "fan_in_fan_out, lora_bias, layer_replication and target_parameters are not served"),
        (not config.get("rank_pattern") and not config.get("alpha_pattern"),
         "per-module rank_pattern / alpha_pattern are not served"),
    ]
    for ok, problem in checks:
        if not ok:
            raise InvalidRequest(f"{path}: {problem}", field="path")
    return config, raw


def _check_ia3_config(config: dict, path: Path) -> dict:
    """An IA3 config the engine serves: its feedforward modules (input-scaled) among the
    projections that run alone, nothing else trained."""
    inputs = config.get("feedforward_modules") or []
    if isinstance(inputs, str) or not all(isinstance(m, str) for m in inputs):
        raise InvalidRequest(f"{path}: feedforward_modules must be a list of module names",
                             field="path")
    fused = sorted(set(inputs) - set(IA3_INPUT_MODULES))
    if fused:
        raise InvalidRequest(
            f"{path}: IA3 feedforward_modules {fused} are not served: q, k and v run as one "
            f"fused matmul over one input; input scaling is served on "
            f"{', '.join(IA3_INPUT_MODULES)}", field="path")
    if config.get("modules_to_save") or config.get("fan_in_fan_out"):
        raise InvalidRequest(f"{path}: IA3 adapters with modules_to_save or fan_in_fan_out "
                             "are not served", field="path")
    return config


def _check_virtual_config(config: dict, path: Path) -> dict:
    """A prompt- or prefix-tuning config the engine serves: a causal LM's, its virtual
    tokens on the decoder alone."""
    count = config.get("num_virtual_tokens")
    if isinstance(count, bool) or not isinstance(count, int) \
            or not 0 < count <= MAX_VIRTUAL_TOKENS:
        raise InvalidRequest(f"{path}: num_virtual_tokens must be an integer in "
                             f"1..{MAX_VIRTUAL_TOKENS}, got {count!r}", field="path")
    if config.get("task_type") != "CAUSAL_LM":
        raise InvalidRequest(f"{path}: task_type is {config.get('task_type')!r}; "
                             "prompt and prefix tuning are served for CAUSAL_LM", field="path")
    if config.get("num_transformer_submodules", 1) != 1:
        raise InvalidRequest(f"{path}: num_transformer_submodules must be 1 (a decoder)",
                             field="path")
    return config


VIRTUAL_KEY = "prompt_embeddings"  # the one tensor PEFT saves for prompt learning
VIRTUAL_KINDS = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
MAX_VIRTUAL_TOKENS = 1024  # PEFT's examples use 8-100
KINDS = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}


def adapter_kind(folder: str | Path) -> str:
    """lora, dora, ia3, prompt or prefix, from the folder's adapter_config.json, for
    listings ("unknown" where it cannot be read: the listing still answers)."""
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_bytes()
                            [:MAX_CONFIG_BYTES])
        kind = KINDS.get(config.get("peft_type", "LORA"), "unknown")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return "dora" if kind == "lora" and config.get("use_dora") else kind


def scaling(config: dict) -> float:
    """LoRA's output scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha, rank = config.get("lora_alpha", 8), config["r"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# safetensors' names of the dtypes adapters may use, and torch's
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 1 << 20  # a PEFT adapter's header: ~100 bytes per tensor


@contextmanager
def open_weights(folder: Path, roots: list[Path] | None = None):
    """`adapter_model.safetensors` opened lazily (safetensors' `safe_open`: the header is
    parsed and checked against the file's size, no tensor is read yet); pickled formats are
    refused outright. With `roots`, the file itself must resolve inside them: a link in an
    allowed folder to a file elsewhere is refused like a path outside the roots."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [name for name in PICKLED_FILES if (folder / name).exists()]
        if pickled:
            raise InvalidRequest(
                f"{folder / pickled[0]} is a pickled weight file, which is never loaded "
                "(unpickling runs arbitrary code); save the adapter as safetensors",
                field="path")
        raise InvalidRequest(f"{folder} has no adapter_model.safetensors", field="path")
    if roots is not None:
        confine(weights, roots)
    try:
        with safe_open(weights, framework="pt") as file:
            yield file
    except (SafetensorError, OSError) as e:
        raise InvalidRequest(f"{weights} is not a readable safetensors file: {e}",
                             field="path") from e


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Load `adapter_model.safetensors`, refusing pickled formats outright."""
    with open_weights(folder) as file:
        return {key: file.get_tensor(key) for key in file.keys()}


def load_lora(name: str, path: str | Path, base: BaseShape, roots: list[Path],
              max_rank: int, dtype: torch.dtype = torch.float32,
              version: str | None = None) -> LoraWeights:
    """Read and validate the PEFT adapter at `path` against `base`.

    Every tensor's name, dtype and shape are checked from the file's header before any
    tensor is read, so a huge or lying file costs no memory; then the file is read once,
    whole, and what was read is what is checked and served. With `version` (the
    content_version a registration recorded), files whose bytes differ are refused with
    AdapterChanged: a folder rewritten since never serves other weights under the name.
    Validation and scaling run in float32; the result is kept in `dtype` (the serving
    dtype: a bf16 RAM tier holds twice the adapters of an fp32 one)."""
    folder = confine(path, roots)
    if not folder.is_dir():
        raise InvalidRequest(f"adapter path {path} is not a folder", field="path")
    changed = AdapterChanged(f"{folder}'s files are not the ones registered (their content "
                             "changed since)", field="path")
    try:
        config, raw_config = read_config(folder, max_rank, roots)
        tensors, raw = _read_tensors(folder, roots, _check_header(folder, roots, base, config))
    except InvalidRequest:
        # files that fail a check: if they are not the registered ones, that is the answer
        if version and content_version(folder, roots) != version:
            raise changed from None
        raise
    if version and _version(raw_config, raw) != version:
        raise changed
    if config.get("peft_type") == "IA3":
        return _ia3_weights(name, folder, base, config, tensors)
    if config.get("peft_type") in VIRTUAL_KINDS:
        return _virtual_weights(name, folder, base, config, tensors, dtype)
    scale, a, b, magnitude = scaling(config), {}, {}, {}
    for key, tensor in tensors.items():
        layer, module, which = _parse_key(key, folder, base)
        if which == "ia3":
            raise InvalidRequest(f"{folder}: {key} is an IA3 vector, and "
                                 "adapter_config.json says LORA", field="path")
        tensor = _finite(tensor, folder, key)
        if which == "A":
            a[(layer, module)] = tensor.to(dtype)
        elif which == "B":
            b[(layer, module)] = (tensor * scale).to(dtype)
        else:  # DoRA's magnitude: kept in float32, it scales the output whole
            magnitude[(layer, module)] = tensor
    if not a or a.keys() != b.keys():
        raise InvalidRequest(f"{folder}: every LoRA A needs its B and the adapter needs at "
                             "least one pair", field="path")
    dora = bool(config.get("use_dora"))
    if magnitude.keys() != (a.keys() if dora else set()):
        raise InvalidRequest(f"{folder}: " + (
            "a DoRA adapter (use_dora=true) needs a lora_magnitude_vector beside every LoRA "
            "pair" if dora else "lora_magnitude_vector tensors need use_dora=true in "
            "adapter_config.json"), field="path")
    return LoraWeights(name, config["r"], a, b, frozenset(module for _, module in a),
                       magnitude)


def _finite(tensor: torch.Tensor, folder: Path, key: str) -> torch.Tensor:
    """`tensor` in float32, refused if it holds NaN or inf."""
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise InvalidRequest(f"{folder}: {key} has non-finite values (NaN or inf)",
                             field="path")
    return tensor


def _ia3_weights(name: str, folder: Path, base: BaseShape, config: dict,
                 tensors: dict[str, torch.Tensor]) -> LoraWeights:
    """An IA3 adapter's vectors (kept in float32: each scales a whole projection)."""
    ia3 = {}
    for key, tensor in tensors.items():
        layer, module, which = _parse_key(key, folder, base)
        if which != "ia3":
            raise InvalidRequest(f"{folder}: {key} is not an IA3 vector (ia3_l), and "
                                 "adapter_config.json says IA3", field="path")
        ia3[(layer, module)] = _finite(tensor, folder, key).reshape(-1)
    if not ia3:
        raise InvalidRequest(f"{folder}: an IA3 adapter needs at least one ia3_l vector",
                             field="path")
    modules = frozenset(module for _, module in ia3)
    return LoraWeights(name, 0, {}, {}, modules, ia3=ia3,
                       ia3_inputs=modules & set(config.get("feedforward_modules") or []))


def _virtual_weights(name: str, folder: Path, base: BaseShape, config: dict,
                     tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> LoraWeights:
    """A prompt- or prefix-tuning adapter: its one tensor (shape checked from the header),
    prefix tuning's split per layer into keys and values, PEFT's layout."""
    kind = VIRTUAL_KINDS[config["peft_type"]]
    tensor = _finite(tensors[VIRTUAL_KEY], folder, VIRTUAL_KEY)
    if kind == "prefix":  # [count, layers * 2 * kv_out] -> [layers, 2, count, kv_out]
        count = tensor.shape[0]
        tensor = tensor.view(count, base.num_layers, 2, -1).permute(1, 2, 0, 3).contiguous()
    return LoraWeights(name, 0, {}, {}, virtual=VirtualTokens(kind, tensor.to(dtype)))


def _virtual_shape(base: BaseShape, config: dict) -> tuple[int, int]:
    """The shape PEFT saves `prompt_embeddings` in for this base: [count, hidden] for
    prompt tuning, [count, layers * 2 * kv_out] for prefix tuning."""
    count, hidden = config["num_virtual_tokens"], base.shapes["q_proj"][0]
    if VIRTUAL_KINDS[config["peft_type"]] == "prompt":
        return count, hidden
    return count, base.num_layers * 2 * base.shapes["k_proj"][1]


def _read_tensors(folder: Path, roots: list[Path],
                  declared: dict[str, tuple[tuple[int, ...], str]]) -> tuple[dict, bytes]:
    """The weights file's tensors, and its bytes, read at most as large as its `declared`
    tensors need; AdapterChanged if what was read is not what the header declared (the
    file was rewritten between the two)."""
    size = sum(math.prod(shape) * FLOAT_DTYPES[kind].itemsize
               for shape, kind in declared.values())
    raw = _read(folder / "adapter_model.safetensors", roots, 8 + MAX_HEADER_BYTES + size,
                "the tensors its header declares need")
    try:
        tensors = safetensors.torch.load(raw)
    except SafetensorError as e:
        raise InvalidRequest(f"{folder / 'adapter_model.safetensors'} is not a readable "
                             f"safetensors file: {e}", field="path") from e
    if {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()} != {
            key: (shape, FLOAT_DTYPES[kind]) for key, (shape, kind) in declared.items()}:
        raise AdapterChanged(f"{folder}'s weights changed while they were read; try again",
                             field="path")
    return tensors, raw


def _check_header(folder: Path, roots: list[Path], base: BaseShape,
                  config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's (shape, dtype) as the safetensors header declares it, every one
    checked against `base` and the config (LoRA's rank, IA3's feedforward modules); no
    tensor is read."""
    declared = {}
    rank, inputs = config.get("r"), config.get("feedforward_modules") or []
    virtual = config.get("peft_type") in VIRTUAL_KINDS
    with open_weights(folder, roots) as file:
        if virtual and set(file.keys()) != {VIRTUAL_KEY}:
            raise InvalidRequest(f"{folder}: a {config['peft_type']} adapter holds one tensor, "
                                 f"{VIRTUAL_KEY!r}; this file has {sorted(file.keys())[:8]}",
                                 field="path")
        for key in file.keys():
            header = file.get_slice(key)
            if virtual:
                expected = _virtual_shape(base, config)
            else:
                _, module, which = _parse_key(key, folder, base)
                in_f, out_f = base.shapes[module]
                expected = {"A": (rank, in_f), "B": (out_f, rank), "M": (out_f,),
                            "ia3": (1, in_f) if module in inputs else (out_f, 1)}[which]
            shape = tuple(header.get_shape())
            if shape != expected:
                raise InvalidRequest(
                    f"{folder}: {key} has shape {list(shape)}, this base model needs "
                    f"{list(expected)}; the adapter was trained for a different base model",
                    field="path")
            if header.get_dtype() not in FLOAT_DTYPES:
                raise InvalidRequest(f"{folder}: {key} is {header.get_dtype()}; adapter "
                                     f"weights are one of {', '.join(FLOAT_DTYPES)}",
                                     field="path")
            declared[key] = (shape, header.get_dtype())
    return declared


def _parse_key(key: str, folder: Path, base: BaseShape) -> tuple[int, str, str]:
    match = _KEY.match(key)
    if match is None:
        raise InvalidRequest(f"{folder}: unexpected tensor {key!r}; only LoRA A/B weights "
                             "(and DoRA magnitudes) and IA3 vectors of decoder-layer "
                             "projections are served",
                             field="path")
    layer, module, which = int(match[1]), match[2], match[3] or match[5] or "M"
    if module not in TARGET_MODULES:
        raise InvalidRequest(f"{folder}: target module {module!r} is not one of "
                             f"{', '.join(TARGET_MODULES)}", field="path")
    if layer >= base.num_layers:
        raise InvalidRequest(f"{folder}: {key} is for layer {layer}, the base model has "
                             f"{base.num_layers} layers; it was trained for another base",
                             field="path")
    return layer, module, which


def compose(name: AdapterKey, parts: list[tuple[LoraWeights, float]],
            max_rank: int) -> LoraWeights:
    """A weighted linear merge of adapters, exact, as ONE adapter of concatenated rank.

    sum_i w_i B_i A_i = [w_1 B_1, ..., w_n B_n] @ [A_1; ...; A_n]. A module one part does
    not target contributes zero rows/columns there. Same result as PEFT's
    `add_weighted_adapter(combination_type="cat")`.
    """
    virtual = next((lora for lora, _ in parts if lora.virtual is not None), None)
    if virtual is not None:
        raise InvalidRequest(f"adapter {virtual.name!r} is a {virtual.kind}-tuning adapter, "
                             "which is not composed: its virtual tokens stand before the "
                             "prompt and have no weight to sum with others; serve it alone",
                             field="adapters")
    ia3 = next((lora.name for lora, _ in parts if lora.ia3), None)
    if ia3 is not None:
        raise InvalidRequest(f"adapter {ia3!r} is an IA3 adapter, which is not composed: "
                             "it multiplies activations where LoRA adds to them, so a "
                             "weighted sum of the two has no agreed meaning (and IA3 "
                             "vectors do not add up); serve it alone", field="adapters")
    dora = next((lora.name for lora, _ in parts if lora.dora), None)
    if dora is not None:
        raise InvalidRequest(f"adapter {dora!r} is a DoRA adapter, which is not composed: "
                             "its magnitude rescales the whole projection, so a weighted sum "
                             "with other adapters has no agreed meaning; serve it alone",
                             field="adapters")
    rank = sum(lora.rank for lora, _ in parts)
    if rank > max_rank:
        raise InvalidRequest(f"composed rank {rank} exceeds max_lora_rank {max_rank}",
                             field="adapters")
    keys = sorted(set().union(*(lora.a.keys() for lora, _ in parts)))
    a, b = {}, {}
    for key in keys:
        # a part that does not target this module contributes zero rows / columns
        in_f = next(lora.a[key].shape[1] for lora, _ in parts if key in lora.a)
        out_f = next(lora.b[key].shape[0] for lora, _ in parts if key in lora.b)
        a[key] = torch.cat([lora.a[key] if key in lora.a else torch.zeros(lora.rank, in_f)
                            for lora, _ in parts])
        b[key] = torch.cat([lora.b[key] * weight if key in lora.b
                            else torch.zeros(out_f, lora.rank) for lora, weight in parts], dim=1)
    return LoraWeights(name, rank, a, b, frozenset(module for _, module in keys))


def save_lora(lora: LoraWeights, folder: Path) -> Path:
    """Write `lora` as a PEFT adapter folder (float32, scaling already in B, so alpha = r):
    the inverse of `load_lora`. For engines that read adapters from disk themselves (the
    vLLM backend), so they only ever see weights lorag has validated."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, module), a in lora.a.items():
        block = "mlp" if module in _MLP else "self_attn"
        prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = lora.b[(layer, module)].float().contiguous()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
              "lora_alpha": lora.rank, "target_modules": sorted(lora.target_modules),
              "lora_dropout": 0.0, "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
