"""The residual VQ's training statistics without host syncs: the same numbers as the direct formulas."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from quantization import CodebookUsage, EuclideanCodebook
from training.run_logger import RunningMeans


def test_usage_counts_equal_bincount_per_stage():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 4, 50), generator=g)  # (B, n_used, F)
    usage = CodebookUsage(n_q=6, bins=16)
    usage.update(codes, seconds=1.5)
    usage.update(codes[:1, :2])  # fewer stages: the others untouched
    for i in range(6):
        expected = torch.bincount(codes[:, i].reshape(-1), minlength=16).double() if i < 4 else torch.zeros(16, dtype=torch.float64)
        if i < 2:
            expected += torch.bincount(codes[:1, i].reshape(-1), minlength=16).double()
        assert torch.equal(usage.counts[i], expected), i
    stats = usage.compute(sync=False)
    assert set(stats) == {f"{k}_q{i}" for i in range(4) for k in ("usage", "perplexity")}
    assert 0 < stats["perplexity_q0"] <= 16
    assert stats["usage_q3"] == float((torch.bincount(codes[:, 3].reshape(-1), minlength=16) > 0).float().mean())


def test_ema_update_equals_the_one_hot_formula():
    """index_add_ sums (no host sync) give the original's one-hot matmul statistics."""
    torch.manual_seed(0)
    book = EuclideanCodebook(8, 32, kmeans_init=False, threshold_ema_dead_code=0).train()
    x = torch.randn(4, 25, 8)
    before = {k: v.clone() for k, v in book.state_dict().items()}
    _, codes = book(x)
    flat, onehot = x.reshape(-1, 8), F.one_hot(codes.reshape(-1), 32).double()
    cluster = before["cluster_size"].double() * 0.99 + onehot.sum(0) * 0.01
    embed_avg = before["embed_avg"].double() * 0.99 + (flat.double().t() @ onehot).t() * 0.01
    torch.testing.assert_close(book.cluster_size.double(), cluster, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(book.embed_avg.double(), embed_avg, rtol=1e-5, atol=1e-6)


def test_codebook_initialised_once_and_again_after_loading_an_uninitialised_state():
    torch.manual_seed(0)
    book = EuclideanCodebook(4, 8, kmeans_iters=2, threshold_ema_dead_code=0).train()
    fresh = {k: v.clone() for k, v in book.state_dict().items()}
    book(torch.randn(1, 40, 4))
    assert float(book.inited) == 1.0 and book.embed.abs().sum() > 0
    book(torch.randn(1, 40, 4) + 100)  # no second k-means: the EMA moves the entries a little
    assert book.embed.mean() < 5
    book.load_state_dict(fresh)  # an uninitialised state: k-means runs again on the next batch
    book(torch.randn(1, 40, 4) + 100)
    assert book.embed.mean() > 10  # k-means on the +100 batch (then one EMA step, as the original)


def test_running_means_skip_non_finite_values_and_stay_on_device():
    means = RunningMeans()
    means.add({"a": torch.tensor(1.0), "b": 2.0})
    means.add({"a": torch.tensor(float("nan")), "b": 4.0})
    means.add({"a": torch.tensor(3.0), "c": torch.tensor(float("inf"))})
    assert means.sums["a"].device.type == "cpu" and means.sums["a"].dtype == torch.float64
    out = means.pop()
    assert out == {"a": 2.0, "b": 3.0} and not math.isnan(out["a"])  # "c" had no finite value
    assert means.pop() == {}
