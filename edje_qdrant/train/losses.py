"""Training losses: contrastive (first stage), listwise ITM with mined hard negatives, MLM, text recovery."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, text) rows; embeddings L2-normalised."""
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def negative_mask(caption_image: torch.Tensor, image_ids: torch.Tensor, captions: list[str],
                  image_captions: list[set[str]]) -> torch.Tensor:
    """Bool [C, I]: True where image j may serve as a negative for caption i.

    Excluded: the caption's own image (same image id, also when the image appears twice in the batch) and any
    image one of whose captions is textually identical to caption i (normalised: lower case, stripped).
    """
    allowed = caption_image.view(-1, 1) != image_ids.view(1, -1)
    norm = [c.strip().lower() for c in captions]
    for j, caps in enumerate(image_captions):
        normed = {c.strip().lower() for c in caps}
        for i, c in enumerate(norm):
            if c in normed:
                allowed[i, j] = False
    return allowed


def mine_hard_negatives(sim: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [R, k] of the k most similar allowed columns per row (first-stage similarity ``sim`` [R, C]).

    Rows with fewer than k allowed columns repeat their hardest allowed one; rows with none raise ValueError.
    """
    if bool((allowed.sum(1) == 0).any()):
        raise ValueError("a row has no allowed negative; the batch needs at least two different images")
    masked = sim.masked_fill(~allowed, float("-inf"))
    k_eff = min(k, sim.shape[1])
    top = masked.topk(k_eff, dim=1)
    idx = top.indices
    # replace picks that fell on disallowed columns (too few allowed) with the row's hardest allowed column
    bad = torch.isinf(top.values)
    if bool(bad.any()):
        idx = torch.where(bad, idx[:, :1].expand_as(idx), idx)
    if k_eff < k:
        idx = torch.cat([idx, idx[:, :1].expand(-1, k - k_eff)], dim=1)
    return idx


def sample_hard_negatives(sim: torch.Tensor, allowed: torch.Tensor, k: int, pool: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` columns per row drawn without replacement from its ``pool`` hardest allowed ones (pool <= k: the
    hardest k, as ``mine_hard_negatives``). Drawing from a wider pool softens the damage of false negatives."""
    if pool <= k:
        return mine_hard_negatives(sim, allowed, k)
    cand = mine_hard_negatives(sim, allowed, pool)  # [R, pool]
    pick = torch.rand(cand.shape, generator=generator).argsort(dim=1)[:, :k]
    return cand.gather(1, pick)


def listwise_itm_loss(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over [positive, negatives...]: ``scores`` [R, 1+k], positive in column 0."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), target)


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, prob: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a fraction ``prob`` of the non-special tokens by [MASK]; labels are -100 where not masked.

    At least one token per row is masked when the row has any maskable token.
    """
    maskable = ~special
    r = torch.rand(input_ids.shape, generator=generator)
    chosen = (r < prob) & maskable
    # guarantee one masked token per row: the maskable token with the smallest draw
    none = chosen.sum(1) == 0
    if bool(none.any()):
        r2 = r.masked_fill(~maskable, 2.0)
        first = r2.argmin(1)
        rows = torch.nonzero(none & maskable.any(1)).flatten()
        chosen[rows, first[rows]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    masked = torch.where(chosen, torch.full_like(input_ids, mask_id), input_ids)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over masked positions: ``logits`` [B, L, V], ``labels`` [B, L] with -100 elsewhere."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def text_recovery_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cosine) between the joint encoder's caption embedding and the first-stage text embedding."""
    return (1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()
