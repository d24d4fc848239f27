"""The training losses on top of next-token cross-entropy: Mixtral's load-balancing loss
and the router z-loss, and the per-layer expert load they are judged by."""

from __future__ import annotations

import torch

from smoe.routing import count_experts


def load_balancing_loss(
    router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None, per_layer: bool = False
) -> torch.Tensor:
    """Switch Transformer auxiliary loss, summed over layers' tokens:

        E * Σ_e f_e · P_e,   f_e = share of top-k slots routed to e,  P_e = mean router probability of e

    router_logits: one [N, E] tensor per layer; mask [N] (1 = real token, 0 = padding).

    per_layer=False pools the statistics of all layers before multiplying, exactly as
    transformers' `load_balancing_loss_func` does. That pooled loss is blind to layers that
    each collapse onto different experts (their pooled load looks even), so training uses
    per_layer=True: the mean over layers of the same loss computed for each layer alone,
    as the Switch Transformer adds one auxiliary loss per MoE layer.
    With Σ_e f_e = K, it equals K when routing is perfectly uniform and grows to E·K/... as
    routing collapses onto few experts (K·E when every token picks the same K, with certainty).
    """
    if per_layer:
        return torch.stack([load_balancing_loss([r], top_k, mask) for r in router_logits]).mean()
    E = router_logits[0].shape[-1]
    weights = torch.ones(router_logits[0].shape[0], device=router_logits[0].device) if mask is None else mask.float()
    slots = torch.zeros(E, device=weights.device)
    probs = torch.zeros(E, device=weights.device)
    rows = 0.0
    for logits in router_logits:
        p = torch.softmax(logits.float(), dim=-1)  # [N, E]
        chosen = torch.topk(p, top_k, dim=-1).indices  # [N, K]
        slots = slots + torch.zeros(E, device=p.device).scatter_add_(
            0, chosen.reshape(-1), weights.repeat_interleave(top_k)
        )
        probs = probs + (p * weights[:, None]).sum(0)
        rows = rows + weights.sum()
    return E * torch.sum((slots / rows) * (probs / rows))


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared log-partition of the router logits: keeps them small and the softmax stable."""
    return torch.stack([torch.logsumexp(r.float(), dim=-1).pow(2).mean() for r in router_logits]).mean()


def expert_load(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """[L, E] share of top-k slots each expert receives, per layer."""
    E = router_logits[0].shape[-1]
    loads = []
    for logits in router_logits:
        chosen = torch.topk(logits.float(), top_k, dim=-1).indices
        loads.append(count_experts(chosen, E).float() / chosen.numel())
    return torch.stack(loads)
