"""Eq. 1 of FFCL (seed 000): the batched all-pairs form against a direct loop over pairs, and the paper's literal
random-partner mode against torch's CosineEmbeddingLoss(margin=0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ffcl_monai.losses.ffcl_pair import FFCLPairLoss, ffcl_pair_loss, same_class_mask


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def eq1(e1: torch.Tensor, e2: torch.Tensor, c1, c2) -> torch.Tensor:
    """Eq. 1 for one pair, written as in the paper."""
    cos = F.cosine_similarity(e1[None], e2[None], eps=1e-8)[0]
    return 1 - cos if bool(torch.equal(torch.as_tensor(c1), torch.as_tensor(c2))) else torch.clamp(cos, min=0)


def loop_pairs(emb, labels, averaging="pairs", neg_weight=1.0):
    pos, neg = [], []
    for i in range(len(emb)):
        for j in range(len(emb)):
            if i == j:
                continue
            t = eq1(emb[i], emb[j], labels[i], labels[j])
            (pos if torch.equal(labels[i], labels[j]) else neg).append(t)
    if averaging == "pairs":
        return (sum(pos) + neg_weight * sum(neg)) / (len(pos) + len(neg))
    return (torch.stack(pos).mean() + neg_weight * torch.stack(neg).mean()) / 2


@pytest.mark.parametrize("averaging", ["pairs", "balanced"])
@pytest.mark.parametrize("neg_weight", [1.0, 2.5])
def test_all_pairs_matches_loop(averaging, neg_weight):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(9, 6, generator=g)  # signed embeddings so that max(0, cos) really clips
    labels = torch.randint(0, 3, (9,), generator=g)
    got = ffcl_pair_loss(emb, labels, averaging=averaging, neg_weight=neg_weight)
    want = loop_pairs(emb, labels, averaging, neg_weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_all_pairs_multilabel_rows_and_gradient():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(6, 4, generator=g, requires_grad=True)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1], [0, 1], [1, 0]])
    got = ffcl_pair_loss(emb, labels)
    torch.testing.assert_close(got, loop_pairs(emb, labels), rtol=1e-5, atol=1e-6)
    got.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    assert same_class_mask(labels)[0, 1] and not same_class_mask(labels)[0, 3]


def test_random_partner_is_cosine_embedding_loss():
    b = 8
    emb = torch.randn(b, 5, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    got = ffcl_pair_loss(emb, labels, pair_mode="random_partner", generator=torch.Generator().manual_seed(3))
    shift = torch.randint(1, b, (b,), generator=torch.Generator().manual_seed(3))
    j = (torch.arange(b) + shift) % b
    assert (j != torch.arange(b)).all()
    target = torch.where(labels == labels[j], 1.0, -1.0)
    want = torch.nn.CosineEmbeddingLoss(margin=0.0)(emb, emb[j], target)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_edge_cases_and_errors():
    one = torch.randn(1, 3, requires_grad=True)
    z = ffcl_pair_loss(one, torch.tensor([0]))
    assert z.item() == 0.0 and z.requires_grad
    same = ffcl_pair_loss(torch.randn(4, 3), torch.zeros(4), averaging="balanced")  # no negative pair at all
    assert torch.isfinite(same)
    # identical embeddings: positives cost 0, negatives cost cos = 1
    e = torch.ones(4, 3)
    assert ffcl_pair_loss(e, torch.zeros(4)).item() == pytest.approx(0.0, abs=1e-6)
    assert ffcl_pair_loss(e, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(8 / 12, abs=1e-6)
    with pytest.raises(ValueError, match="pair_mode"):
        FFCLPairLoss(pair_mode="triplets")
    with pytest.raises(ValueError, match="averaging"):
        FFCLPairLoss(averaging="median")


def test_bf16_input_is_computed_in_float32():
    emb = torch.randn(5, 8).to(torch.bfloat16)
    out = FFCLPairLoss()(emb, torch.tensor([0, 1, 0, 1, 1]))
    assert out.dtype == torch.float32
