"""Which expert does each token go to? Routing traces, statistics and pictures.

    with trace_routing(model) as trace:          # any forward or generation
        model(ids)
    experts, weights, entropy = trace.tokens()   # [n, L, K], [n, L, K], [n, L]

    smoe routes --model DIR --input text.txt --domains labelled.jsonl --out routes/

Statistics follow the Mixtral paper's routing analysis (Jiang et al. 2024, section 5):
per-layer expert load (first choice and top-k), per-domain load (its Fig. 7), and the
share of consecutive tokens routed to the same expert (its Table 5), next to what a
random router would give: 1/E for the first choice, and 1 - C(E-K, K) / C(E, K) for
"the two top-K sets share an expert" (for E = 8, K = 2: 1 - 6/8 · 5/7 = 46.4 %).

Every reader of the routing — traces here, the training losses (smoe/train/losses.py),
usage profiles and the offload prefetcher (smoe/offload.py) — sees it the same way:
`observe_routing` hooks each layer's router and calls back with
(layer, router_logits [N, E], expert_weights [N, K], expert_indices [N, K]). Without an
observer the model pays nothing. `count_experts` is the one expert-usage counter.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from smoe.tokenizer import IncrementalDetokenizer

RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class observe_routing:
    """Call observer(layer, router_logits, expert_weights, expert_indices) after every MoE
    router of `model` runs, until removed (or, used as `with observe_routing(...):`, until the
    block ends). The tensors are the router's own outputs (not detached: a training loss can
    backpropagate through router_logits)."""

    def __init__(self, model, observer: RoutingObserver) -> None:
        self.handles = [
            layer.moe.router.register_forward_hook(lambda module, inputs, out, i=i: observer(i, *out))
            for i, layer in enumerate(model.layers)
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> observe_routing:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def count_experts(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many token slots each expert got: expert_indices [..., K] -> counts [E], on their device."""
    return torch.bincount(expert_indices.reshape(-1), minlength=num_experts)


class RoutingTrace:
    """Collects, per forward pass and layer, each token's top-k experts, weights and router entropy."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.calls: list[list] = []  # one entry per forward: [per layer (indices, weights, entropy)]

    def record(self, layer: int, router_logits, expert_weights, expert_indices) -> None:
        if layer == 0:
            self.calls.append([None] * self.num_layers)
        probs = torch.softmax(router_logits.detach().float(), dim=-1)  # [N, E]
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # [N] nats
        self.calls[-1][layer] = (expert_indices.detach().cpu(), expert_weights.detach().float().cpu(), entropy.cpu())

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All traced token rows in order: experts [n, L, K], weights [n, L, K], entropy [n, L]."""
        if not self.calls:
            raise ValueError("nothing was traced")
        experts = torch.cat([torch.stack([c[0] for c in call], 1) for call in self.calls])
        weights = torch.cat([torch.stack([c[1] for c in call], 1) for call in self.calls])
        entropy = torch.cat([torch.stack([c[2] for c in call], 1) for call in self.calls])
        return experts, weights, entropy

    def to_json(self, token_ids: list[int] | None = None, pieces: list[str] | None = None) -> dict:
        experts, weights, entropy = self.tokens()
        rows = []
        for i in range(experts.shape[0]):
            row = {"experts": experts[i].tolist(), "weights": [[round(w, 4) for w in ws] for ws in weights[i].tolist()],
                   "entropy": [round(h, 4) for h in entropy[i].tolist()]}
            if token_ids is not None and i < len(token_ids):
                row["token_id"] = token_ids[i]
            if pieces is not None and i < len(pieces):
                row["text"] = pieces[i]
            rows.append(row)
        return {"layers": self.num_layers, "tokens": rows}


@contextmanager
def trace_routing(model) -> Iterator[RoutingTrace]:
    """Trace every MoE layer of `model` inside the block; tracing stops when it ends."""
    trace = RoutingTrace(len(model.layers))
    with observe_routing(model, trace.record):
        yield trace


# --------------------------------------------------------------------------- statistics


def random_same_topk(num_experts: int, top_k: int) -> float:
    """P(two independent uniform top-k sets share at least one expert) = 1 - C(E-K, K) / C(E, K)."""
    return 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)


def layer_stats(docs: list[torch.Tensor], num_experts: int) -> list[dict]:
    """docs: per document, experts [n, L, K] in token order. Consecutive pairs never cross documents."""
    experts = torch.cat(docs)  # [N, L, K]
    N, L, K = experts.shape
    out = []
    for layer in range(L):
        first = count_experts(experts[:, layer, 0], num_experts).double() / N
        topk = count_experts(experts[:, layer], num_experts).double() / (N * K)
        same_first = same_topk = pairs = 0
        for doc in docs:
            if len(doc) < 2:
                continue
            a, b = doc[:-1, layer], doc[1:, layer]  # [n-1, K]
            same_first += (a[:, 0] == b[:, 0]).sum().item()
            same_topk += (a[:, :, None] == b[:, None, :]).any(-1).any(-1).sum().item()
            pairs += len(a)
        nonzero = topk[topk > 0]
        out.append({
            "layer": layer,
            "first_choice_share": first.tolist(),  # sums to 1
            "topk_share": topk.tolist(),  # sums to 1
            "consecutive_same_first": same_first / pairs if pairs else None,
            "consecutive_same_topk": same_topk / pairs if pairs else None,
            "load_cv": (topk.std(unbiased=False) / topk.mean()).item(),
            "load_entropy_bits": -(nonzero * nonzero.log2()).sum().item(),
        })
    return out


def routing_report(per_doc: list[tuple[str, torch.Tensor]], num_experts: int, top_k: int) -> dict:
    """per_doc: (domain, experts [n, L, K]) for each document."""
    report = {
        "num_experts": num_experts, "top_k": top_k,
        "tokens": sum(len(e) for _, e in per_doc),
        "random_baseline": {"first_choice_share": 1 / num_experts, "consecutive_same_first": 1 / num_experts,
                            "consecutive_same_topk": random_same_topk(num_experts, top_k),
                            "load_entropy_bits": math.log2(num_experts)},
        "layers": layer_stats([e for _, e in per_doc], num_experts),
        "domains": {},
    }
    for domain in sorted({d for d, _ in per_doc}):
        docs = [e for d, e in per_doc if d == domain]
        report["domains"][domain] = {"tokens": sum(len(e) for e in docs), "layers": layer_stats(docs, num_experts)}
    return report


# ------------------------------------------------------------------------------- running


@torch.no_grad()
def trace_documents(model, tokenizer, docs: list[dict], max_tokens_per_doc: int = 1024):
    """Run each document (with BOS) through the model; return [(domain, experts, token_ids)]."""
    out = []
    limit = min(max_tokens_per_doc, model.config.max_position_embeddings)
    for doc in docs:
        ids = tokenizer.encode(doc["text"])[:limit]
        with trace_routing(model) as trace:
            model(torch.tensor([ids], device=model.device))
        experts, _, _ = trace.tokens()
        out.append((doc.get("domain", "text"), experts, ids))
    return out


def token_pieces(tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    """Text of each token such that the pieces add up to the decoded text (a character split
    over several byte tokens is shown on the token that completes it); `context`: the ids
    before them, so that the first piece keeps the space that separates it from them."""

    detok = IncrementalDetokenizer(tokenizer, context=context)
    pieces = [detok.add(i) for i in ids]
    if pieces:
        pieces[-1] += detok.flush()
    return pieces


PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac", "#1f77b4", "#17becf", "#bcbd22", "#8c564b", "#e377c2", "#7f7f7f"]


def expert_color(e: int) -> str:
    if e < len(PALETTE):
        return PALETTE[e]
    return f"hsl({(e * 137.508) % 360:.0f}, 60%, 60%)"  # golden-angle hues past the palette


def write_heatmaps(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"all": report["layers"], **{d: v["layers"] for d, v in report["domains"].items()}}
    paths = []
    vmax = max(max(layer["topk_share"]) for g in groups.values() for layer in g)
    for name, layers in groups.items():
        share = [layer["topk_share"] for layer in layers]
        fig, ax = plt.subplots(figsize=(1 + 0.5 * len(share[0]), 1 + 0.35 * len(share)))
        im = ax.imshow(share, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(share[0])))
        ax.set_yticks(range(len(share)))
        ax.set_title(f"top-{report['top_k']} share: {name}")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out / f"heatmap_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_html(docs: list[tuple[str, torch.Tensor, list[str]]], num_experts: int, layer: int, out: Path,
               title: str = "smoe routing") -> Path:
    """A self-contained page: each token coloured by its first-choice expert at `layer`;
    hovering a token lists its top-k experts at every layer; a selector changes the layer."""
    num_layers = docs[0][1].shape[1] if docs else 0
    spans = []
    for domain, experts, pieces in docs:
        spans.append(f'<div class="doc"><div class="domain">{html.escape(domain)}</div><pre>')
        for i, piece in enumerate(pieces):
            firsts = experts[i, :, 0].tolist()
            tip = "\n".join(f"layer {L}: experts {experts[i, L].tolist()}" for L in range(num_layers))
            spans.append(
                f'<span class="t" data-e="{",".join(map(str, firsts))}" title="{html.escape(tip)}" '
                f'style="background:{expert_color(firsts[layer])}">{html.escape(piece)}</span>'
            )
        spans.append("</pre></div>")
    legend = "".join(f'<span class="key" style="background:{expert_color(e)}">expert {e}</span>'
                     for e in range(num_experts))
    options = "".join(f'<option value="{L}"{" selected" if L == layer else ""}>layer {L}</option>'
                      for L in range(num_layers))
    palette = json.dumps([expert_color(e) for e in range(num_experts)])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; background: #fafafa; }}
pre {{ white-space: pre-wrap; font-size: 14px; line-height: 1.6; }}
.t {{ border-radius: 2px; color: #111; }}
.key {{ display: inline-block; padding: 2px 8px; margin: 2px; border-radius: 3px; font-size: 12px; }}
.doc {{ border-top: 1px solid #ddd; margin-top: 1em; }}
.domain {{ font-weight: bold; color: #555; margin-top: .5em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Each token is coloured by its first-choice expert at
<select id="layer">{options}</select>; hover a token for its top-k experts at every layer.</p>
<div>{legend}</div>
{"".join(spans)}
<script>
const palette = {palette};
function paint(layer) {{
  for (const t of document.querySelectorAll(".t")) {{
    t.style.background = palette[Number(t.dataset.e.split(",")[layer])];
  }}
}}
const select = document.getElementById("layer");
select.addEventListener("change", e => paint(Number(e.target.value)));
const linked = /layer=(\\d+)/.exec(location.hash);  // routes.html#layer=3 opens at layer 3
if (linked && Number(linked[1]) < select.options.length) select.value = linked[1];
paint(Number(select.value));
</script>
</body></html>
"""
    out.write_text(page, encoding="utf-8")
    return out


def run_routes(model, tokenizer, docs: list[dict], out: Path, *, layer: int | None = None,
               max_tokens_per_doc: int = 1024, html_docs: int = 20) -> dict:
    """Trace documents, write routes.json, heatmaps and routes.html into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    traced = trace_documents(model, tokenizer, docs, max_tokens_per_doc)
    config = model.config
    report = routing_report([(d, e) for d, e, _ in traced], config.num_local_experts, config.num_experts_per_tok)
    (out / "routes.json").write_text(json.dumps(report, indent=1) + "\n")
    write_heatmaps(report, out)
    layer = config.num_hidden_layers // 2 if layer is None else layer
    shown, per_domain = [], {}
    for domain, experts, ids in traced:  # the first few documents of each domain
        if per_domain.get(domain, 0) < max(1, html_docs // max(1, len(report["domains"]))):
            per_domain[domain] = per_domain.get(domain, 0) + 1
            shown.append((domain, experts, token_pieces(tokenizer, ids)))
    write_html(shown, config.num_local_experts, layer, out / "routes.html")
    return report
