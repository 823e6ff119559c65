import torch

from dmlray.training.memory import CrossBatchMemory


def test_enqueue_fills_then_wraps_around_oldest_first():
    mem = CrossBatchMemory(size=5, dim=2)
    slots = mem.enqueue(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 2]))
    assert slots.tolist() == [0, 1, 2] and len(mem) == 3
    slots = mem.enqueue(torch.arange(6.0, 12.0).view(3, 2), torch.tensor([3, 4, 5]))
    # slots 3, 4 then wrap to 0: label 0 (the oldest) is overwritten
    assert slots.tolist() == [3, 4, 0] and len(mem) == 5
    emb, lab = mem.contents()
    assert lab.tolist() == [5, 1, 2, 3, 4]
    assert emb[0].tolist() == [10.0, 11.0]


def test_batch_larger_than_memory_keeps_only_the_last_rows():
    mem = CrossBatchMemory(size=3, dim=1)
    slots = mem.enqueue(torch.arange(5.0).view(5, 1), torch.arange(5))
    assert slots.tolist() == [-1, -1, 2, 0, 1]
    emb, lab = mem.contents()
    assert sorted(lab.tolist()) == [2, 3, 4]
    for row, slot in zip(range(5), slots.tolist(), strict=True):
        if slot >= 0:
            assert emb[slot].item() == row


def test_entries_are_detached():
    mem = CrossBatchMemory(size=4, dim=3)
    x = torch.randn(2, 3, requires_grad=True)
    mem.enqueue(x * 2, torch.tensor([0, 1]))
    emb, _ = mem.contents()
    assert not emb.requires_grad


def test_state_dict_round_trip_continues_identically():
    a = CrossBatchMemory(size=7, dim=4)
    for _ in range(3):
        a.enqueue(torch.randn(3, 4), torch.randint(0, 5, (3,)))
    b = CrossBatchMemory(size=7, dim=4)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(3, 4), torch.randint(0, 5, (3,))
    assert a.enqueue(x, y).tolist() == b.enqueue(x, y).tolist()
    ea, la = a.contents()
    eb, lb = b.contents()
    assert torch.equal(ea, eb) and torch.equal(la, lb) and len(a) == len(b) == 7
