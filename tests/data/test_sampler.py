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


def test_length_buckets_sort_each_optimizer_step_and_cut_padding():
    """length_bucket = grad_accum: every step is one modality, its micro-batches sorted by length."""
    from qllava.data.packing import padding_fraction
    from tools.padding_report import synthetic_lengths

    micro, accum, world = 2, 4, 2
    lengths = [(-1) ** (i // 3) * (10 + (37 * i) % 400) for i in range(400)]
    ranks = [
        list(GroupedSampler(lengths, micro, seed=5, world_size=world, rank=r, length_bucket=accum))
        for r in range(world)
    ]
    plain = list(GroupedSampler(lengths, micro, seed=5, world_size=world, rank=0))
    assert len(ranks[0]) == len(ranks[1]) == len(plain) and not set(ranks[0]) & set(ranks[1])
    per_step = micro * accum
    full_steps = 0
    for start in range(0, len(ranks[0]) - per_step + 1, per_step):
        step = [i for r in ranks for i in r[start : start + per_step]]
        if len({lengths[i] > 0 for i in step}) > 1:
            continue  # the mixed tail at the end of the epoch
        full_steps += 1
        # Across the step, each micro-batch's samples are no longer than the previous one's.
        sizes = [abs(lengths[i]) for i in ranks[0][start : start + per_step]]
        assert sizes == sorted(sizes, reverse=True)
    assert full_steps >= len(ranks[0]) // per_step - 2

    tokens, modality = synthetic_lengths(4000, seed=0)
    one = padding_fraction(tokens, list(GroupedSampler(modality, 8, seed=0)), 8)
    sixteen = padding_fraction(tokens, list(GroupedSampler(modality, 8, seed=0, length_bucket=16)), 8)
    assert sixteen < one / 3


def test_length_bucket_resume_skips_exactly_the_consumed_samples():
    full = list(GroupedSampler(LENGTHS, 4, seed=3, length_bucket=3))
    s = GroupedSampler(LENGTHS, 4, seed=3, length_bucket=3)
    s.set_epoch(0, skip=20)
    assert list(s) == full[20:] and sorted(full) == sorted(set(full))
