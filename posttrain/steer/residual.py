"""Find the modules that write to the residual stream, for any supported architecture.

A pre-norm decoder's residual stream is the sum of what its writers add: the token (and,
for GPT-2, position) embeddings, and in every block the attention output projection and the
MLP down projection (plus their biases, and the experts of a mixture-of-experts MLP). Erasing
a direction from the stream by editing weights means editing exactly these (`interventions`).

Discovery is by module type and name, not by a per-model table:
- blocks: the `nn.ModuleList` holding `config.num_hidden_layers` modules of one class;
- embeddings: every `nn.Embedding` outside the blocks whose width is the hidden size (the
  lm_head is a Linear, rotary embeddings hold no weights), e.g. GPT-2's `wte` and `wpe`;
  Gemma's `ScaledWordEmbedding` multiplies by sqrt(hidden) after the lookup, a scalar, so
  orthogonalising its weight is still exact;
- writers: modules in a block whose last name is in `WRITER_NAMES` (Llama/Qwen2/Qwen3/Mistral/
  Gemma/Phi-3 `o_proj`, `down_proj`; GPT-2 `c_proj`; GPT-NeoX `dense`, `dense_4h_to_h`;
  `out_proj`, `fc2`, `w2`, `wo` elsewhere) and whose output width is the hidden size; GPT-2's
  `Conv1D` stores its weight transposed, (in, out), which `Writer.out_dim` records;
- fused MoE experts (transformers 5): a 3-D parameter named in `EXPERT_PARAMS` holding
  (experts, hidden, inner) weights, or (experts, inner, hidden) when the module says
  `is_transposed`, with its `<name>_bias` when present;
- sublayers: the block's direct children that contain writers (`self_attn`, `mlp`, ...):
  their outputs are what the block adds to the stream, where Arditi et al. hook.

An architecture where a block has no writer raises UserError naming the module types found.
Simplified on purpose: architectures that normalise a sublayer's output before adding it
(Gemma 2/3's `post_feedforward_layernorm`, OLMo 2) are flagged `sandwich_norm`: there the
hooks sit on those norms and weight orthogonalisation is only approximate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from posttrain.errors import UserError

WRITER_NAMES = (
    "o_proj",
    "down_proj",
    "c_proj",
    "dense",
    "dense_4h_to_h",
    "out_proj",
    "fc2",
    "w2",
    "wo",
)
EXPERT_PARAMS = ("down_proj", "w2")
SANDWICH_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


@dataclass
class Writer:
    """One weight that adds to the residual stream; `out_dim` is its hidden-size axis."""

    name: str  # module path in the model
    module: nn.Module
    kind: str  # "embedding" | "linear" | "conv1d" | "experts"
    param: str = "weight"  # the parameter's name on `module`
    out_dim: int = 0  # axis of the weight that indexes the residual stream
    bias: str | None = None  # name of the bias parameter on `module`, when it has one

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def bias_tensor(self) -> torch.Tensor | None:
        return getattr(self.module, self.bias) if self.bias else None


@dataclass
class ResidualLayout:
    """Where the residual stream is read and written in one model."""

    hidden_size: int
    blocks: list[nn.Module]
    block_names: list[str]
    embeddings: list[Writer]
    writers: list[list[Writer]]  # per block
    sublayers: list[list[nn.Module]] = field(default_factory=list)  # per block, hook points
    sandwich_norm: bool = False

    def all_writers(self) -> list[Writer]:
        return self.embeddings + [w for block in self.writers for w in block]


def hidden_size(model: nn.Module) -> int:
    """The residual width: the input embedding's output width."""
    return model.get_input_embeddings().weight.shape[1]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the decoder blocks."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) == 1 and (n_layers is None or len(module) == n_layers):
            return name, module
    arch = type(model).__name__
    raise UserError(
        f"{arch}: no list of {n_layers} decoder blocks found; only decoder-only causal LMs "
        "with a ModuleList of blocks are supported"
    )


def discover(model: nn.Module, extra_writer_names: tuple[str, ...] = ()) -> ResidualLayout:
    """The residual layout of `model`, or UserError when a block's writers are unknown."""
    d = hidden_size(model)
    blocks_name, blocks = find_blocks(model)
    names = set(WRITER_NAMES) | set(extra_writer_names)
    layout = ResidualLayout(d, list(blocks), [], find_embeddings(model, blocks_name, d), [])
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}"
        writers = block_writers(block, prefix, d, names)
        if not writers:
            raise UserError(unknown_architecture(model, block))
        sandwich = all(hasattr(block, n) for n in SANDWICH_NORMS) and hasattr(
            block, "pre_feedforward_layernorm"
        )
        layout.sandwich_norm |= sandwich
        layout.block_names.append(prefix)
        layout.writers.append(writers)
        layout.sublayers.append(block_sublayers(block, prefix, writers, sandwich))
    return layout


def find_embeddings(model: nn.Module, blocks_name: str, d: int) -> list[Writer]:
    """Embeddings outside the blocks that add a width-`d` vector to the stream."""
    out = []
    for name, module in model.named_modules():
        if name.startswith(blocks_name + ".") or not isinstance(module, nn.Embedding):
            continue
        if module.weight.shape[1] == d:
            out.append(Writer(name, module, "embedding", out_dim=1))
    return out


def block_writers(block: nn.Module, prefix: str, d: int, names: set[str]) -> list[Writer]:
    """The writers inside one block, in module order."""
    writers = []
    for rel, module in block.named_modules():
        last = rel.rsplit(".", 1)[-1]
        writer = as_writer(f"{prefix}.{rel}", module, d) if last in names else None
        writer = writer or experts_writer(f"{prefix}.{rel}", module, d)
        if writer is not None:
            writers.append(writer)
    return writers


def as_writer(name: str, module: nn.Module, d: int) -> Writer | None:
    """A Linear with out_features == d, or a GPT-2 Conv1D whose (in, out) weight ends in d."""
    bias = "bias" if getattr(module, "bias", None) is not None else None
    if isinstance(module, nn.Linear) and module.out_features == d:
        return Writer(name, module, "linear", out_dim=0, bias=bias)
    if type(module).__name__ == "Conv1D" and module.weight.shape[1] == d:
        return Writer(name, module, "conv1d", out_dim=1, bias=bias)
    return None


def experts_writer(name: str, module: nn.Module, d: int) -> Writer | None:
    """Fused MoE experts: a 3-D (experts, hidden, inner) down projection on `module`."""
    for param in EXPERT_PARAMS:
        weight = module._parameters.get(param)
        if weight is None or weight.dim() != 3:
            continue
        out_dim = 2 if getattr(module, "is_transposed", False) else 1
        if weight.shape[out_dim] != d:
            continue
        bias = f"{param}_bias" if module._parameters.get(f"{param}_bias") is not None else None
        return Writer(name, module, "experts", param=param, out_dim=out_dim, bias=bias)
    return None


def block_sublayers(
    block: nn.Module, prefix: str, writers: list[Writer], sandwich: bool
) -> list[nn.Module]:
    """The block's direct children whose outputs are added to the stream (hook points)."""
    if sandwich:
        return [getattr(block, n) for n in SANDWICH_NORMS]
    children: list[str] = []
    for w in writers:
        child = w.name[len(prefix) + 1 :].split(".", 1)[0]
        if child not in children:
            children.append(child)
    return [block.get_submodule(c) for c in children]


def unknown_architecture(model: nn.Module, block: nn.Module) -> str:
    """The one-line UserError text for a block with no known writer."""
    types = sorted({type(m).__name__ for m in block.modules() if m is not block})
    leaves = sorted(
        {n.rsplit(".", 1)[-1] for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    )
    return (
        f"{type(model).__name__}: unknown residual-stream writers in {type(block).__name__} "
        f"(module types: {', '.join(types)}; linear layers: {', '.join(leaves) or 'none'}); "
        "add the output projections' names to posttrain.steer.residual.WRITER_NAMES"
    )


def untie_lm_head(model: nn.Module) -> bool:
    """Give lm_head its own copy of a weight it shares with the input embedding; True if tied.

    Editing the embedding in place would otherwise edit the unembedding too. The config's
    `tie_word_embeddings` is set False so a saved model is loaded untied.
    """
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None:
        text_config.tie_word_embeddings = False
    return True
