"""LiveBytes: the exact CPU count of live tensor bytes, checked against independent counts to the byte."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tfmem.profiler.live_bytes import LiveBytes
from tfmem.profiler.storages import CpuOutOfMemoryError, storage_bytes, storage_key

torch.set_num_threads(1)  # tiny tensors: thread hand-offs would dominate on a shared 2-core machine

F32 = 4
I64 = 8


def test_peak_equals_an_independent_count_of_known_tensors():
    keep = torch.zeros(1000)  # made before: counted from its first use
    with LiveBytes() as tracker:
        a = keep + 1                                       # 4000
        b = torch.arange(37)                               # 296 (int64)
        v = a.view(10, 100)[::2]                           # a view: no new bytes
        c = torch.ones(250, dtype=torch.float64)           # 2000
        at_peak = storage_bytes(keep, a, b, v, c)
        live_at_peak = tracker.current_bytes
        del a, v, c                                        # frees 6000
        d = torch.empty(10, 10)                            # 400
        now = storage_bytes(keep, b, d)
        live_now = tracker.current_bytes
    assert at_peak == 1000 * F32 + 1000 * F32 + 37 * I64 + 250 * 8
    assert live_at_peak == at_peak
    assert tracker.peak_bytes == at_peak
    assert live_now == now == 1000 * F32 + 37 * I64 + 100 * F32


def test_views_and_in_place_ops_add_nothing():
    with LiveBytes() as tracker:
        x = torch.zeros(64, 64)
        before = tracker.current_bytes
        x.add_(1)
        x.mul_(2)
        views = [x.t(), x[::2], x.view(-1), x.detach(), x.as_strided((8,), (1,))]
        torch.relu_(x)
        after = tracker.current_bytes
    assert before == after == 64 * 64 * F32 == storage_bytes(x, *views)


def test_out_and_resize_count_only_the_growth():
    with LiveBytes() as tracker:
        x = torch.zeros(100)                       # 400
        y = torch.empty(0)                         # 0
        torch.add(x, 1, out=y)                     # y's storage grows to 400
        after_out = tracker.current_bytes
        y.resize_(300)                             # grows to 1200
        after_grow = tracker.current_bytes
        y.resize_(10)                              # a smaller view of the same 1200-byte storage
        after_shrink = tracker.current_bytes
        torch.add(x[:10], 1, out=y)                # fits: no growth
        after_fitting_out = tracker.current_bytes
    assert after_out == 800
    assert after_grow == after_shrink == after_fitting_out == 400 + 1200 == storage_bytes(x, y)


def test_track_counts_existing_tensors_once_and_model_parts_by_role():
    model = nn.Linear(8, 4)  # 32 + 4 floats
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()  # momentum buffers: 36 floats
    tracker = LiveBytes()
    tracker.track(model, optimizer, [model.weight, {"again": model.bias}])
    expected = 3 * 36 * F32  # parameters, gradients, momentum
    assert tracker.current_bytes == tracker.peak_bytes == expected
    with tracker:
        pass
    assert tracker.peak_breakdown == {
        "parameters": 36 * F32, "gradients": 36 * F32, "optimizer_state": 36 * F32, "activations": 0,
    }


def test_backward_allocations_are_seen_and_counted_exactly():
    w = torch.randn(32, 32, requires_grad=True)  # 4096 bytes, pre-existing
    x = torch.randn(16, 32)                      # 2048 bytes, pre-existing
    with LiveBytes() as tracker:
        tracker.track(w, x)
        h = x @ w                      # 2048, saved for backward
        loss = h.relu().sum()          # relu output 2048 (saved), sum 4
        forward_peak = tracker.peak_bytes
        loss.backward()                # grad of h, relu backward, w.grad: all new storages
    assert forward_peak == 4096 + 2048 + 2048 + 2048 + 4
    assert tracker.peak_bytes > forward_peak  # backward ran under the tracker
    assert w.grad is not None


def test_checkpoint_recomputation_is_seen():
    # Four blocks with a wide middle: without checkpointing all four middles are kept for backward;
    # with it, only the block inputs are, and backward recomputes one block's middle at a time.
    blocks = [nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 16)) for _ in range(4)]
    x = torch.randn(64, 16, requires_grad=True)

    def run(use_checkpoint: bool) -> torch.Tensor:
        h = x
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=False) if use_checkpoint else block(h)
        return h

    calls = {"addmm": 0}

    class Counting(LiveBytes):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.addmm.default:
                calls["addmm"] += 1
            return super().__torch_dispatch__(func, types, args, kwargs)

    peaks = {}
    for use_checkpoint in (False, True):
        calls["addmm"] = 0
        with Counting() as tracker:
            run(use_checkpoint).sum().backward()
        peaks[use_checkpoint] = tracker.peak_bytes
        counted = calls["addmm"]
        for block in blocks:
            block.zero_grad(set_to_none=True)
        x.grad = None
        # Under checkpointing each block's first Linear runs again in backward; the last one does not (its
        # output is not saved, and non-reentrant checkpointing stops once it has what backward needs).
        assert counted == (12 if use_checkpoint else 8)
    assert peaks[True] < peaks[False]


def test_fake_tensors_are_counted_without_allocating():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with LiveBytes() as tracker:
            a = torch.empty(4096, 4096)               # 64 MiB, fake
            b = a @ a                                 # 64 MiB, fake
            del b
            c = torch.empty(10, dtype=torch.float16)  # 20 bytes
    assert tracker.peak_bytes == 2 * 4096 * 4096 * F32
    assert tracker.current_bytes == 4096 * 4096 * F32 + 20
    del a, c


def test_limit_raises_out_of_memory_from_backward_with_the_requested_bytes():
    model = nn.Linear(64, 64)
    x = torch.randn(32, 64)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        with LiveBytes(limit_bytes=45_000) as tracker:
            tracker.track(model)
            loss = model(x).relu().sum()   # params 16640 + x 8192 + 2 x 8192 + 4 = 41220
            under = tracker.current_bytes
            loss.backward()                 # + relu's gradient, 8192: over
    assert under <= 45_000
    error = caught.value
    assert isinstance(error, CpuOutOfMemoryError)
    assert error.requested_bytes > 0 and error.live_bytes > 45_000 == error.limit_bytes
    assert "limit" in str(error)


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="`limit_bytes` must be a positive"):
        LiveBytes(limit_bytes=0)


def test_peak_breakdown_of_a_training_step_sums_to_the_peak():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    param_bytes = storage_bytes(*model.parameters())
    x = torch.randn(4, 128)
    with LiveBytes() as tracker:
        tracker.track(model, optimizer)
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]))
        loss.backward()
        optimizer.step()
    split = tracker.peak_breakdown
    # Small activations: the peak is in the optimizer step, with parameters, gradients and both moments live.
    assert sum(split.values()) == tracker.peak_bytes
    assert split["parameters"] == param_bytes
    assert split["gradients"] == param_bytes
    assert split["optimizer_state"] >= 2 * param_bytes
    assert storage_key(model[0].weight) is not None


def test_a_tracker_measures_one_window():
    tracker = LiveBytes()
    with tracker:
        torch.zeros(3)
    with pytest.raises(RuntimeError, match="one window"):
        tracker.__enter__()


def test_gradients_freed_by_zero_grad_at_a_peak_are_split_safely():
    # The first decrease after a new peak copies the peak's live set from inside PyTorch's deallocation
    # of a storage; here that is `p.grad = None` in zero_grad, where reading tensors would crash.
    model = nn.Linear(256, 256)
    with LiveBytes() as tracker:
        tracker.track(model)
        model(torch.randn(8, 256)).sum().backward()
        peak_holder = torch.empty(1024, 256)  # a new peak (1 MiB) while the gradients are live
        model.zero_grad(set_to_none=True)     # the first decrease: a gradient storage is freed
        del peak_holder
    split = tracker.peak_breakdown
    grad_bytes = storage_bytes(*model.parameters())
    assert split["gradients"] == grad_bytes
    assert split["parameters"] == grad_bytes
    assert split["activations"] >= 1024 * 256 * F32
    assert sum(split.values()) == tracker.peak_bytes


def _to_512(n: int) -> int:
    return -(-n // 512) * 512  # the CUDA caching allocator's block rounding


def test_size_of_sets_the_bytes_counted_for_every_storage():
    model = nn.Linear(30, 1)  # weight 120 bytes, bias 4: 512 counted each
    with LiveBytes(size_of=_to_512) as tracker:
        tracker.track(model)
        a = torch.zeros(3)                         # 12 -> 512
        b = torch.ones(200)                        # 800 -> 1024
        c = torch.empty(0)                         # 0 -> 0
        torch.add(b, 1, out=c)                     # resized to 800 -> 1024
        counted = tracker.current_bytes
        del a
        after_free = tracker.current_bytes
    assert counted == tracker.peak_bytes == 2 * 512 + 512 + 1024 + 1024
    assert after_free == counted - 512
    assert tracker.peak_breakdown == {"parameters": 1024, "gradients": 0, "optimizer_state": 0, "activations": 2560}
    # The limit is in counted bytes too: two 4-byte tensors cost 1024.
    with pytest.raises(CpuOutOfMemoryError) as caught:
        with LiveBytes(limit_bytes=1000, size_of=_to_512):
            kept = [torch.zeros(1), torch.zeros(1)]  # noqa: F841
    assert caught.value.requested_bytes == 512 and caught.value.live_bytes == 1024


def test_observer_hears_each_storage_counted_and_freed_in_matching_pairs():
    events: list[tuple[str, int, int]] = []

    def balance() -> int:
        return sum(n if kind == "alloc" else -n for kind, _, n in events)

    class Log:
        def on_alloc(self, key: int, nbytes: int) -> None:
            events.append(("alloc", key, nbytes))
            assert tracker.current_bytes == balance(), "the tracker's figures should already include it"

        def on_free(self, key: int, nbytes: int) -> None:
            events.append(("free", key, nbytes))  # integers only: this runs inside PyTorch's deallocation

    tracker = LiveBytes(observer=Log())
    with tracker:
        model = nn.Linear(64, 64)
        model(torch.randn(8, 64)).sum().backward()
        grads = {storage_key(p.grad): storage_bytes(p.grad) for p in model.parameters()}
        y = torch.empty(0)
        y.resize_(100)                             # a resize: the old 0 bytes freed, 400 allocated
        resize = events[-2:]
        model.zero_grad(set_to_none=True)          # gradients freed from inside `p.grad = None`
        freed_by_zero_grad = {key: n for kind, key, n in events if kind == "free" and key in grads}
        del model, y
    assert [(kind, n) for kind, _, n in resize] == [("free", 0), ("alloc", 400)] and resize[0][1] == resize[1][1]
    assert freed_by_zero_grad == grads
    live: dict[int, int] = {}  # keys are addresses, reused after a free: pair events by order
    for kind, key, nbytes in events:
        if kind == "alloc":
            assert key not in live
            live[key] = nbytes
        else:
            assert live.pop(key) == nbytes
    assert live == {}
    assert balance() == tracker.current_bytes == 0
    assert len(events) > 10


def test_extension_points_are_checked():
    with pytest.raises(TypeError, match="`size_of` must be a function"):
        LiveBytes(size_of=512)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`observer` must have `on_alloc"):
        LiveBytes(observer=object())  # type: ignore[arg-type]
