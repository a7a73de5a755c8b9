"""The PPO value function: a scalar head on the policy (`PolicyWithValueHead`), one
`nn.Linear(hidden, 1)` on the policy's final hidden states, zero-initialised (V = 0 at the start),
trained with the policy's adapter (its gradient reaches the shared trunk, scaled by `vf_coef`) and
saved beside the adapter as `final/value_head.safetensors`. Why not a separate critic (InstructGPT
initialises one from the reward model)? With an adapter, one base model in memory then serves the
policy, the value function and the reference (adapter disabled), and one forward gives log-probs
and values; a second full model would double memory and forwards. The cost is that value and policy
gradients share features (`vf_coef` balances them), as in TRL's old
`AutoModelForCausalLMWithValueHead`. The shared trunk makes the reward's scale matter: with a
reward model whose scores spread over several units (the tiny world's log-likelihood readout: std
about 4.2), the value loss (median 9.4, up to 128) outweighs the policy loss (about 0.16) six times
at the median even after `vf_coef=0.1`, and the adapter follows the critic instead of the reward
(PPO then *lowered* the learned reward it optimised, -1.69 -> -8.97 on held-out replies: the
`reward_norm off` row of `evidence/ppo.py`). Hence `reward_norm` (on by default, as in Ziegler et
al. 2019): the scores are shifted and scaled to mean 0, std 1 on the first rollout batch, and that
fixed affine map (part of the checkpointed state) is used for the whole run, so the objective does
not move; beta is then per unit of that std. A zero-initialised head at the policy's learning rate
learns slowly (explained variance under 0.1 after 300 steps in the tiny world, so the advantages
carry the rewards' whole spread across prompts), hence `value_lr_mult`: the head's own learning
rate (the separate critic learning rate of OpenRLHF and verl; the loop has one AdamW, so the head
computes V = m x head(h) and divides its gradients by m: under Adam, weight decay aside, that is
exactly a learning rate of m x lr, with the gradient norm that clipping sees unchanged; the saved
head is the effective one).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from posttrain.evaluate.generate import device_of
from posttrain.losses.lm import base_model
from posttrain.modeling.adapters import save_model
from posttrain.train.loop import Batch
from posttrain.train.online import completion_rows, scatter_rows

VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyWithValueHead(nn.Module):
    """The policy (a causal LM, possibly peft-wrapped) and a scalar value head on its final
    hidden states; the loop trains both (see the module doc for why a head, not a critic)."""

    def __init__(self, policy: nn.Module, lr_mult: float = 1.0):
        super().__init__()
        self.policy, self.lr_mult = policy, float(lr_mult)
        hidden = base_model(policy).config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1, device=device_of(policy), dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        if self.lr_mult != 1.0:  # V = m x head: Adam's steps move V m times as far; the hooks
            for p in self.value_head.parameters():  # give the head's gradients of m = 1, so
                p.register_hook(lambda g: g / self.lr_mult)  # clipping sees the same norm

    def values(self, rows: Tensor) -> Tensor:
        """V of the states whose final hidden rows are given: (N, H) -> (N,) float32."""
        return self.lr_mult * self.value_head(rows.float()).squeeze(-1).float()


def token_values(model: PolicyWithValueHead, batch: Batch) -> Tensor:
    """V_t (B, T) of the state before each completion token, 0 on padding."""
    return scatter_rows(model.values(completion_rows(model.policy, batch)),
                        batch["completion_mask"])  # fmt: skip


def save_policy_and_value(model: PolicyWithValueHead, tokenizer, path: Path) -> None:
    """`final/`: the adapter or model folder, plus value_head.safetensors (weight, bias)."""
    save_model(model.policy, tokenizer, path)
    head = {k: (model.lr_mult * v.detach()).cpu().contiguous()
            for k, v in model.value_head.state_dict().items()}  # fmt: skip
    save_file(head, str(Path(path) / VALUE_HEAD_FILE))
