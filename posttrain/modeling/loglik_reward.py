"""A reward model that adds the response's log-likelihood under a frozen causal LM to a head.

    reward(x, y) = w . h_last(x, y) + b + a * sum_t log p_LM(y_t | x, y_<t)

`posttrain reward readout=last+loglik`: the LM (an SFT model, typically) is frozen; only the
linear head (w, b) on the final hidden state of the last non-pad token and the scalar weight
a train. Why: in the tiny world a last-token head, however trained, ranks a right answer above
a wrong one for only 61-70% of held-out pairs, while the SFT model answers most test items
right (so its log-likelihood knows which answer is right) but prefers complying with harmful
requests; the head learns refusals, politeness and length, the log-likelihood term
correctness (README: 99% of held-out pairs). Both come from one
forward pass (the chunked hidden-state path of `losses.lm`; the full logits never exist).

Saved as a model folder: the LM as `save_pretrained` writes it (loads in plain transformers)
plus `reward_head.safetensors` (score.weight, score.bias, loglik_weight); `load` rebuilds it.
Simplified on purpose: the LM never trains here (the `adapter` key is ignored), and the sum is
not length-normalised, so the term also favours responses the LM finds short and likely.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.losses.lm import final_hidden, output_head, row_logprobs

HEAD_FILE = "reward_head.safetensors"


class LoglikReward(nn.Module):
    """Score head + learned weight x response log-likelihood, over a frozen causal LM."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm.requires_grad_(False)
        self.score = nn.Linear(lm.config.hidden_size, 1)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)
        self.loglik_weight = nn.Parameter(torch.zeros(()))

    def forward(self, batch: dict) -> torch.Tensor:
        """(R,) rewards of right-padded rows (input_ids, attention_mask, targets)."""
        with torch.no_grad():
            hidden = final_hidden(self.lm, batch)  # (R, T, H), post-norm
            loglik, _ = row_logprobs(hidden, output_head(self.lm), batch["targets"])
            last = batch["attention_mask"].sum(1) - 1
            h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
        return self.score(h_last).squeeze(-1) + self.loglik_weight * loglik

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval()  # frozen: no dropout, whatever the loop asks
        return self


def is_loglik_reward(folder: str | Path) -> bool:
    return (Path(folder) / HEAD_FILE).is_file()


def save(model: LoglikReward, tokenizer, path: str | Path) -> None:
    """The LM folder with the tokenizer, plus the head file."""
    path = Path(path)
    model.lm.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    head = {"score.weight": model.score.weight, "score.bias": model.score.bias,
            "loglik_weight": model.loglik_weight}  # fmt: skip
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.items()}, path / HEAD_FILE)


def load(path: str | Path) -> LoglikReward:
    """A saved LoglikReward, fp32 on the CPU."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model = LoglikReward(lm)
    head = load_file(str(Path(path) / HEAD_FILE))
    with torch.no_grad():
        model.score.weight.copy_(head["score.weight"])
        model.score.bias.copy_(head["score.bias"])
        model.loglik_weight.copy_(head["loglik_weight"])
    return model
