"""Training losses: next-token cross-entropy, MoE router losses, DPO.

Legend: B batch, T tokens, V vocabulary, N = B*T routed tokens, E experts, K experts per token,
L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against labels (B, T) already shifted (labels[t] is the
    token after input t); positions labelled `ignore_index` do not count. Computed in fp32 (on CUDA over bf16
    logits by giants.train.cross_entropy's two Triton passes, which never materialise fp32 logits)."""
    flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if flat.is_cuda:  # (imported here: the CPU path never loads Triton)
        from giants.train.cross_entropy import cross_entropy_rows, triton_ce_ok

        if triton_ce_ok(flat, y):
            return cross_entropy_rows(flat, y, ignore_index).sum() / (y != ignore_index).sum().clamp(min=1)
    return F.cross_entropy(flat.float(), y, ignore_index=ignore_index)


def chunked_lm_loss(head, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                    ignore_index: int = IGNORE_INDEX, chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """causal_lm_loss of head(hidden) computed a block of rows at a time: hidden (B, T, D), head maps
    (N, D) -> (N, vocab_size) logits. Equal to the one-shot loss up to summation order; each block's logits stay
    under `chunk_bytes` in fp32, so on the CPU they come from the reused heap instead of a fresh mmap per
    tensor (the full (B*T, V) logits cost ~200k page faults a step at batch 8 x 128 x 49,152)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    rows = max(1, chunk_bytes // (4 * vocab_size))
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], rows):
        total = total + F.cross_entropy(head(h[i:i + rows]).float(), y[i:i + rows], ignore_index=ignore_index,
                                        reduction="sum")
    return total / (y != ignore_index).sum().clamp(min=1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum over t of log p(labels[t]) for each row, skipping ignored positions: (B, T, V), (B, T) -> (B,)."""
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


# ---- mixture-of-experts router losses ----------------------------------------------------------

def load_balancing_loss(router_logits: torch.Tensor, top_k: int,
                        token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch / Mixtral load-balancing loss of one layer: E * sum_i f_i * P_i.

    router_logits: (N, E). f_i = share of tokens whose top-k includes expert i (the f_i sum to K,
    as in transformers' Mixtral loss, so the coefficient in a Mixtral config.json means the same
    here); P_i = mean router probability of expert i. A uniform router gives K. `token_mask` (N,)
    drops padding. Returns (loss, utilisation (E,)) with utilisation = f / K, summing to 1."""
    N, E = router_logits.shape
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    # top-k on probabilities or logits selects the same experts (softmax is monotonic).
    selected = torch.topk(probs, top_k, dim=-1).indices  # (N, K)
    hits = F.one_hot(selected, E).sum(1).float()  # (N, E), 0/1 per expert; f is not differentiable
    if token_mask is None:
        n = torch.tensor(float(N), device=probs.device)
        f = hits.sum(0) / n
        P = probs.sum(0) / n
    else:
        m = token_mask.reshape(-1).to(probs.dtype)
        n = m.sum().clamp_min(1.0)
        f = (hits * m[:, None]).sum(0) / n
        P = (probs * m[:, None]).sum(0) / n
    return E * torch.sum(f * P), (f / top_k).detach()


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss of one layer: mean over tokens of logsumexp(router_logits)^2."""
    z = torch.logsumexp(router_logits.float(), dim=-1).square()  # (N,)
    if token_mask is None:
        return z.mean()
    m = token_mask.reshape(-1).to(z.dtype)
    return (z * m).sum() / m.sum().clamp_min(1.0)


@dataclass
class RouterLosses:
    aux_loss: torch.Tensor  # mean over MoE layers of the load-balancing loss
    z_loss: torch.Tensor  # mean over MoE layers of the z-loss
    per_layer_aux: torch.Tensor  # (L,), detached
    per_layer_z: torch.Tensor  # (L,), detached
    utilisation: torch.Tensor  # (L, E): share of routed assignments per expert, rows sum to 1


def router_losses(router_logits: list[torch.Tensor], top_k: int,
                  token_mask: torch.Tensor | None = None) -> RouterLosses:
    """Both router losses for every MoE layer, averaged over layers (so a coefficient does not need
    rescaling when the depth changes)."""
    if not router_logits:
        raise ValueError("router_losses: no router logits (is this a mixture-of-experts model?)")
    aux, z, util = [], [], []
    for logits in router_logits:
        a, u = load_balancing_loss(logits, top_k, token_mask)
        aux.append(a)
        z.append(router_z_loss(logits, token_mask))
        util.append(u)
    aux_t, z_t = torch.stack(aux), torch.stack(z)
    return RouterLosses(aux_t.mean(), z_t.mean(), aux_t.detach(), z_t.detach(), torch.stack(util))


def balance_score(utilisation: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of each row of utilisation (..., E): 1 = perfectly even, 0 = one expert."""
    u = utilisation.float().clamp_min(1e-12)
    return -(u * u.log()).sum(-1) / torch.log(torch.tensor(float(u.shape[-1])))


# ---- DPO -----------------------------------------------------------------------------------------

@dataclass
class DPOOutput:
    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi - log ref) on the chosen answer, detached
    rejected_rewards: torch.Tensor  # (B,)

    @property
    def margin(self) -> torch.Tensor:
        return (self.chosen_rewards - self.rejected_rewards).mean()

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> DPOOutput:
    """Direct Preference Optimization (Rafailov et al. 2023), sigmoid loss: all inputs are (B,) summed
    log-probabilities of the answer tokens."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return DPOOutput(loss, beta * chosen.detach(), beta * rejected.detach())
