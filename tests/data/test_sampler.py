from qllava.data.sampler import GroupedSampler

LENGTHS = [(-1) ** i * (10 + 7 * i % 50) for i in range(103)]  # positive: image sample, negative: text-only


def batches(sampler, micro):
    stream = list(sampler)
    return [stream[i : i + micro] for i in range(0, len(stream), micro)]


def test_same_seed_same_order_other_epoch_other_order():
    a = list(GroupedSampler(LENGTHS, 4, seed=1))
    assert a == list(GroupedSampler(LENGTHS, 4, seed=1))
    s = GroupedSampler(LENGTHS, 4, seed=1)
    s.set_epoch(1)
    assert list(s) != a and sorted(list(s)) != [] and len(a) == len(s)


def test_micro_batches_hold_one_modality_except_the_mixed_tail():
    mixed = [b for b in batches(GroupedSampler(LENGTHS, 4, seed=0), 4) if len({LENGTHS[i] > 0 for i in b}) > 1]
    assert len(mixed) <= 1


def test_ranks_get_disjoint_equal_shares_of_similar_length():
    ranks = [list(GroupedSampler(LENGTHS, 4, seed=0, world_size=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(GroupedSampler(LENGTHS, 4, seed=0, world_size=2))
    assert not set(ranks[0]) & set(ranks[1])
    assert len(ranks[0]) * 2 > len(LENGTHS) - 2 * 8  # fewer than one megabatch per kind left out


def test_resume_skips_exactly_the_consumed_samples():
    full = list(GroupedSampler(LENGTHS, 4, seed=3))
    s = GroupedSampler(LENGTHS, 4, seed=3)
    s.set_epoch(0, skip=12)
    assert list(s) == full[12:] and len(s) == len(full) - 12


def test_random_order_without_grouping_covers_all_full_batches():
    s = GroupedSampler(LENGTHS, 4, seed=0, group_by_modality_length=False)
    assert len(set(s)) == len(s) == 100
