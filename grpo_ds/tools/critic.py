"""A PPO-style critic (value model). Only the memory benchmark uses it: it measures the engine GRPO
does without.

PPO (Schulman et al. 2017; the recap in DeepSeekMath, section 4.1) trains a value model V_psi
beside the policy for its GAE advantages. We build it the usual way (OpenRLHF, TRL): the policy's
transformer body (no lm_head) with a scalar head on the final hidden state, as its own ZeRO-3
engine with its own optimizer. It is trained with PPO's clipped value loss

    L_V = 1/|tokens| sum_{i,t} 0.5 max((V_it - R_it)^2, (V_old_it + clip(V_it - V_old_it, -c, c) - R_it)^2)

The returns R come from the outcome reward r_i with gamma = lambda = 1: R_it = r_i for every token
of o_i. The benchmark needs what the critic costs in memory and time (its params, gradients,
optimizer states, activations, and its forward before the update), not a tuned PPO.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueModel(nn.Module):
    """body: a HF decoder without its LM head (e.g. LlamaModel); value_head: hidden -> 1."""

    def __init__(self, body: nn.Module, hidden_size: int):
        super().__init__()
        self.body = body
        self.value_head = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, input_ids, attention_mask, completion_len: int) -> torch.Tensor:
        """input_ids [N, Tp+Tc] (left-padded prompt + completion) -> values [N, Tc] float32.

        The value of completion token t is read where its log-prob is: at the hidden state of
        position t - 1, i.e. before the token is emitted.
        """
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=False).last_hidden_state
        return self.value_head(hidden[:, -completion_len - 1:-1]).squeeze(-1).float()


def build_value_model(config) -> ValueModel:
    """A critic the policy's shape from its HF config (random init; call inside zero.Init to
    partition it as it is built)."""
    from transformers import AutoModel

    return ValueModel(AutoModel.from_config(config), config.hidden_size)


def value_loss(values, old_values, returns, mask, clip: float, num_tokens: float):
    """Clipped value loss of one micro-batch as its share of the step: summed over its tokens and
    divided by the step's token count, so micro-batch losses add up to the step's loss.

    values, old_values, returns, mask: [n, Tc]. Returns (loss, {"value_loss/sum", "tokens"}).
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    total = (per_token * mask).sum()
    return total / num_tokens, {"value_loss/sum": total.item(), "tokens": mask.sum().item()}


@torch.no_grad()
def critic_values(engine, batch, micro: int) -> torch.Tensor:
    """V_old [B*G, Tc] of the sampled completions, micro-batched (PPO's experience pass)."""
    width = batch.completion_ids.shape[1]
    return torch.cat([engine(part.input_ids, part.attention_mask, width)
                      for part in (batch.slice(s, s + micro) for s in range(0, len(batch), micro))])


def critic_update(engine, batch, old_values, rewards, micro: int, world: int,
                  clip: float = 0.2) -> dict:
    """One optimizer step of the critic over this rank's batch; gradients summed over
    micro-batches and ranks as the policy's update does (update.update)."""
    from grpo_ds.update import step_counts

    _, num_tokens = step_counts(batch, engine.device)
    returns = torch.nan_to_num(rewards.float())[:, None].expand_as(old_values)
    width, total = batch.completion_ids.shape[1], 0.0
    for start in range(0, len(batch), micro):
        part, stop = batch.slice(start, start + micro), start + micro
        values = engine(part.input_ids, part.attention_mask, width)
        loss, metrics = value_loss(values, old_values[start:stop], returns[start:stop],
                                   part.completion_mask, clip, num_tokens)
        engine.backward(loss * world, scale_wrt_gas=False)  # DeepSpeed averages over ranks
        engine.step()
        total += metrics["value_loss/sum"]
    return {"value_loss_local": total / num_tokens}
