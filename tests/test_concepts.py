"""The preservation set R on a synthetic vocabulary whose distances are known (ALGORITHM.md §2)."""
import pytest
import torch

from ap_erase_fast.concepts import is_candidate, mentions, select_preservation_set
from ap_erase_fast.errors import UserError
from ap_erase_fast.ops import l2_scores

# word -> L2 distance to the erased concept's embedding; three clear clusters of distances
VOCAB = {
    "apple": 1.0, "bread": 1.1, "cloud": 1.25,
    "delta": 5.0, "eagle": 5.1, "flame": 5.3,
    "grape": 9.0, "house": 9.2, "igloo": 9.3,
    "x1": 0.6, "two-words": 0.7, "café": 0.8,  # characters outside a-z</>: dropped although closest
    "zebra": 40.0,  # beyond k_closest
}


def _table(query, vocab=VOCAB):
    g = torch.Generator().manual_seed(0)
    rows = []
    for d in vocab.values():
        direction = torch.randn(query.numel(), generator=g, dtype=torch.float64)
        direction /= direction.norm()
        rows.append((query.flatten().double() + d * direction).reshape(query.shape))
    return list(vocab), torch.stack(rows).float()


def test_candidate_filter_is_the_authors():
    """The authors' detect_special_tokens: lower-case, then every character in a-z</>. This
    library also accepts phrases of such words joined by single spaces. Checked against the old
    filter (no lower-casing), which drops the capitalised words below."""
    words = ["African", "American", "TV", "DNA", "God", "iPhone", "apple", "</w>", "<start>",
             "a/b", "x1", "2nd", "e-mail", "can't", "naïve", "Zürich", "日本", "Ω", "", " ",
             "New York", "van Gogh", "two  spaces", " lead", "trail ", "a-b c", "tab\there",
             "Straße", "ǅ"]
    kept = [w for w in words if is_candidate(w)]
    assert kept == ["African", "American", "TV", "DNA", "God", "iPhone", "apple", "</w>",
                    "<start>", "a/b", "New York", "van Gogh"]


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


def test_capitalised_words_are_candidates_and_keep_their_spelling():
    query = torch.randn(7, 5)
    vocab = {"African": 0.5, "TV": 0.55, **VOCAB}
    words, table = _table(query, vocab)
    r = select_preservation_set("thing", query, words, table, k_closest=2, num_centers=2)
    assert r.words == ["African", "TV"]
    assert r.candidates == 12


def test_k_closest_limits_the_candidates():
    query = torch.randn(7, 5)
    words, table = _table(query)
    r = select_preservation_set("thing", query, words, table, k_closest=3, num_centers=3)
    assert r.words == ["apple", "bread", "cloud"]


def test_k_not_above_the_centres_returns_the_k_closest():
    """The authors return the k candidates themselves when k ≤ num_centers (and when fewer
    usable words than centres exist) instead of refusing."""
    query = torch.randn(7, 5)
    words, table = _table(query)
    r = select_preservation_set("thing", query, words, table, k_closest=4, num_centers=10)
    assert r.words == ["apple", "bread", "cloud", "delta"]
    assert r.distances == pytest.approx([1.0, 1.1, 1.25, 5.0], abs=1e-4)
    r = select_preservation_set("thing", query, words, table, k_closest=50, num_centers=20)
    assert len(r.words) == r.candidates == 10


def test_exclude_erased_drops_the_concept_itself():
    query = torch.randn(7, 5)
    words, table = _table(query)
    keep = select_preservation_set("apple", query, words, table, k_closest=2, num_centers=2)
    drop = select_preservation_set("apple", query, words, table, k_closest=2, num_centers=2,
                                   exclude_erased=True)
    assert "apple" in keep.words and "apple" not in drop.words
    assert mentions("van gogh", "Van Gogh") and mentions("Church", "a CHURCH spire")


def test_empty_candidate_list_is_a_clear_error():
    query = torch.randn(7, 5)
    vocab = {"x1": 1.0, "e-mail": 2.0}
    words, table = _table(query, vocab)
    with pytest.raises(UserError, match="R would be empty"):
        select_preservation_set("thing", query, words, table, k_closest=5, num_centers=2)
