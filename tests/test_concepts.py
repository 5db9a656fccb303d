"""The preservation set R on a synthetic vocabulary whose distances are known (ALGORITHM.md §2)."""
import pytest
import torch

from ap_erase_fast.concepts import select_preservation_set
from ap_erase_fast.ops import l2_scores
from ap_erase_fast.errors import UserError

# word -> L2 distance to the erased concept's embedding; three clear clusters of distances
VOCAB = {
    "apple": 1.0, "bread": 1.1, "cloud": 1.25,
    "delta": 5.0, "eagle": 5.1, "flame": 5.3,
    "grape": 9.0, "house": 9.2, "igloo": 9.3,
    "Upper": 0.5, "x1": 0.6, "two-words": 0.7,  # not a-z only: dropped although closest
    "zebra": 40.0,  # beyond k_closest
}


def _table(query):
    g = torch.Generator().manual_seed(0)
    rows = []
    for d in VOCAB.values():
        direction = torch.randn(query.numel(), generator=g, dtype=torch.float64)
        direction /= direction.norm()
        rows.append((query.flatten().double() + d * direction).reshape(query.shape))
    return list(VOCAB), torch.stack(rows).float()


def test_distances_are_l2_over_all_elements():
    query = torch.randn(7, 5)
    words, table = _table(query)
    torch.testing.assert_close(l2_scores(query, table), torch.tensor(list(VOCAB.values())),
                               rtol=1e-5, atol=1e-5)


def test_one_word_per_kmeans_centre():
    query = torch.randn(7, 5)
    words, table = _table(query)
    r = select_preservation_set("thing", query, words, table, k_closest=9, num_centers=3)
    assert r.words == ["bread", "eagle", "house"]
    assert r.distances == pytest.approx([1.1, 5.1, 9.2], abs=1e-4)
    assert r.candidates == 10  # the a-z words, zebra included


def test_k_closest_limits_the_candidates():
    query = torch.randn(7, 5)
    words, table = _table(query)
    r = select_preservation_set("thing", query, words, table, k_closest=3, num_centers=3)
    assert r.words == ["apple", "bread", "cloud"]


def test_exclude_erased_drops_the_concept_itself():
    query = torch.randn(7, 5)
    words, table = _table(query)
    keep = select_preservation_set("apple", query, words, table, k_closest=2, num_centers=2)
    drop = select_preservation_set("apple", query, words, table, k_closest=2, num_centers=2,
                                   exclude_erased=True)
    assert "apple" in keep.words and "apple" not in drop.words


def test_too_small_vocabulary_is_a_clear_error():
    query = torch.randn(7, 5)
    words, table = _table(query)
    with pytest.raises(UserError, match="usable words"):
        select_preservation_set("thing", query, words, table, k_closest=50, num_centers=20)
