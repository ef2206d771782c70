"""Where each Hugging Face model family keeps its FFN, and how that FFN computes.

``FAMILIES`` is keyed by ``config.model_type``. A :class:`Family` names, relative to the
model's ``base_model``, the decoder layers (``layers``) and, inside one decoder layer, the
module that holds the FFN projections (``ffn``; "" when the projections sit directly on the
decoder layer, as in OPT). Projections are named ``gate``/``up``/``down``; ``conv1d`` marks
GPT-2's ``Conv1D`` whose weights are stored ``[in, out]`` (transposed vs ``nn.Linear``).
The activation comes from the model config (``act_keys``, first one present).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Hugging Face activation names -> prunepath.ops activation names
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "relu": "relu",
}


@dataclass(frozen=True)
class Family:
    layers: str  # path of the decoder-layer ModuleList inside model.base_model
    ffn: str  # path of the FFN module inside a decoder layer ("" = the layer itself)
    gate: str | None
    up: str
    down: str
    act_keys: tuple[str, ...]
    default_act: str | None = None
    conv1d: bool = False
    # attributes of the FFN owner replaced by identities while wrapped (OPT: the layer
    # applies fc1 -> activation_fn -> fc2 itself; fc1 is replaced by the whole routed FFN)
    inline_ffn: bool = False
    act_attr: str | None = None  # inline FFNs: the owner's activation attribute
    dropout: str | None = None  # dropout module applied to the FFN output inside the FFN module
    flattened_input: bool = False  # the FFN sees [B*S, d] (OPT reshapes before fc1)

    @property
    def gated(self) -> bool:
        return self.gate is not None


_GATED_SILU = Family("layers", "mlp", "gate_proj", "up_proj", "down_proj", ("hidden_act",), "silu")
_GATED_GELU_TANH = Family(
    "layers", "mlp", "gate_proj", "up_proj", "down_proj",
    ("hidden_activation", "hidden_act"), "gelu_pytorch_tanh",
)

FAMILIES: dict[str, Family] = {
    "llama": _GATED_SILU,
    "mistral": _GATED_SILU,
    "qwen2": _GATED_SILU,
    "qwen3": _GATED_SILU,
    "gemma": _GATED_GELU_TANH,
    "gemma2": _GATED_GELU_TANH,
    "gemma3_text": _GATED_GELU_TANH,
    "gpt2": Family("h", "mlp", None, "c_fc", "c_proj", ("activation_function",), "gelu_new",
                   conv1d=True, dropout="dropout"),
    "opt": Family("decoder.layers", "", None, "fc1", "fc2", ("activation_function",), "relu",
                  inline_ffn=True, act_attr="activation_fn", flattened_input=True),
    "gpt_neox": Family("layers", "mlp", None, "dense_h_to_4h", "dense_4h_to_h", ("hidden_act",),
                       "gelu"),
}

SUPPORTED = tuple(sorted(FAMILIES))


class UnsupportedModelError(ValueError):
    """The model's family is not in :data:`FAMILIES` (or uses an FFN variant we cannot route)."""


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise UnsupportedModelError(
            f"model must be a Hugging Face PreTrainedModel with config.model_type; got "
            f"{type(model).__name__}. Supported model types: {', '.join(SUPPORTED)}"
        )
    return model_type


def family_of(model: nn.Module) -> Family:
    model_type = model_type_of(model)
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by PrunePath; supported model types: "
            f"{', '.join(SUPPORTED)}"
        )
    return fam


def activation_of(model: nn.Module, fam: Family) -> str:
    """The ops activation name for the model's FFN, read from its config."""
    config = model.config
    name = None
    for key in fam.act_keys:
        name = getattr(config, key, None)
        if name is not None:
            break
    if name is None:
        name = fam.default_act
    if not isinstance(name, str) or name not in HF_ACTIVATIONS:
        raise UnsupportedModelError(
            f"FFN activation {name!r} (config.{'/'.join(fam.act_keys)}) is not supported; "
            f"supported: {', '.join(sorted(HF_ACTIVATIONS))}"
        )
    return HF_ACTIVATIONS[name]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root if path == "" else root.get_submodule(path)


def decoder_layers(model: nn.Module, fam: Family | None = None) -> nn.ModuleList:
    fam = fam or family_of(model)
    base = getattr(model, "base_model", model)
    try:
        layers = get_submodule(base, fam.layers)
    except AttributeError:
        raise UnsupportedModelError(
            f"could not find the decoder layers at base_model.{fam.layers} in "
            f"{type(model).__name__} (model_type {model.config.model_type!r})"
        ) from None
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"base_model.{fam.layers} is not a ModuleList")
    return layers


def ffn_owner(layer: nn.Module, fam: Family) -> nn.Module:
    """The module that holds the FFN projections inside a decoder layer."""
    return get_submodule(layer, fam.ffn)


@dataclass
class FFNWeights:
    """Views of one FFN's parameters in ``nn.Linear`` layout (no copies)."""

    w_gate: torch.Tensor | None  # [F, d]
    w_up: torch.Tensor  # [F, d]
    w_down: torch.Tensor  # [d, F]
    b_up: torch.Tensor | None  # [F]
    b_down: torch.Tensor | None  # [d]

    @property
    def intermediate_size(self) -> int:
        return self.w_up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_up.shape[1]


def projections(owner: nn.Module, fam: Family):
    """(gate, up, down) projection modules of an FFN (gate is None if not gated)."""
    gate = getattr(owner, fam.gate) if fam.gated else None
    return gate, getattr(owner, fam.up), getattr(owner, fam.down)


def ffn_weights(gate: nn.Module | None, up: nn.Module, down: nn.Module, fam: Family) -> FFNWeights:
    """The projections' parameters as ``nn.Linear``-layout views (Conv1D weights transposed)."""

    def w(mod):
        return mod.weight.t() if fam.conv1d else mod.weight

    if gate is not None and getattr(gate, "bias", None) is not None:
        raise UnsupportedModelError(
            "the FFN's gate projection has a bias (e.g. llama with mlp_bias=True); PrunePath's "
            "routed FFN supports biases on the up and down projections only"
        )
    return FFNWeights(
        w_gate=None if gate is None else w(gate),
        w_up=w(up),
        w_down=w(down),
        b_up=getattr(up, "bias", None),
        b_down=getattr(down, "bias", None),
    )


def permute_ffn_(gate: nn.Module | None, up: nn.Module, down: nn.Module, fam: Family,
                 perm: torch.Tensor) -> None:
    """Reorder the FFN's intermediate neurons in place: new neuron i = old neuron perm[i].

    Rows of W_gate/W_up (and b_up), columns of W_down. The Parameter objects (and their
    storage) are kept, so tied references and optimizers stay valid.
    """
    with torch.no_grad():
        for mod in (gate, up):
            if mod is None:
                continue
            p = mod.weight
            dim = 1 if fam.conv1d else 0
            p.copy_(p.index_select(dim, perm.to(p.device)))
            if getattr(mod, "bias", None) is not None:
                mod.bias.copy_(mod.bias.index_select(0, perm.to(mod.bias.device)))
        p = down.weight
        dim = 0 if fam.conv1d else 1
        p.copy_(p.index_select(dim, perm.to(p.device)))
