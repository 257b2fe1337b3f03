"""The CPU memory pool (mamlfast.memory_pool, csrc/memory_pool_cpu.cpp): what it hands out, how it
reuses, splits, merges and unmaps its segments, under threads and fork, and the resident memory of
a recomputing meta-iteration in a fresh process, against the path without recompute."""

import subprocess
import sys
import textwrap

import pytest
import torch

from mamlfast import memory_pool
from mamlfast.ops.extension import load_error

MiB = 2**20
PAGE = 4096


@pytest.fixture
def pool():
    if load_error():
        pytest.skip(load_error())
    assert memory_pool.serve(torch.device("cpu"))
    return memory_pool


def _run(script: str, *args: str) -> str:
    """Run ``script`` with ``args`` in a fresh Python process; its output, or a failure with its error."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_learner_installs_the_pool_before_its_first_work_on_the_cpu():
    if load_error():
        pytest.skip(load_error())
    output = _run("""
        import torch, mamlfast
        from mamlfast import memory_pool
        cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", num_filters=4, image_size=16, meta_batch_size=2)
        learner = mamlfast.MAMLPlusPlus(cfg)
        x = torch.randn(2, 5, 1, 16, 16)
        y = torch.arange(5).expand(2, 5)
        print(memory_pool.stats())
        learner.predict(x, y, x)
        large = torch.ones(2**20)
        print(memory_pool.stats().allocated == 4 * 2**20)
    """)
    assert output.split() == ["None", "True"]


def test_large_tensors_come_from_the_pool_and_small_ones_do_not(pool):
    before = pool.stats()
    large = torch.ones(MiB // 4 + 3)  # a few bytes over 1 MiB: rounded up to whole pages
    assert pool.stats().allocated == before.allocated + MiB + PAGE
    small = torch.ones(1000)
    assert pool.stats().allocated == before.allocated + MiB + PAGE
    assert large.sum().item() == MiB // 4 + 3 and small.sum().item() == 1000
    del large
    assert pool.stats().allocated == before.allocated


def test_freed_memory_is_reused_without_mapping_more(pool):
    first = torch.empty(3 * MiB // 4)
    address = first.data_ptr()
    del first
    reserved = pool.stats().reserved
    second = torch.full((3 * MiB // 4,), 2.0)
    assert second.data_ptr() == address
    assert pool.stats().reserved == reserved
    assert torch.equal(second, torch.full_like(second, 2.0))


def test_release_unmaps_the_free_segments_and_keeps_the_rest(pool):
    kept = torch.ones(40 * MiB // 4)  # more than a segment: a segment of its own
    freed = torch.ones(40 * MiB // 4)
    del freed
    before = pool.stats()
    released = pool.release()
    after = pool.stats()
    assert released >= 40 * MiB
    assert after.reserved == before.reserved - released
    assert after.allocated == before.allocated
    assert kept.sum().item() == 10 * MiB


def test_blocks_are_split_merged_and_taken_first_fit_in_a_fresh_process(pool):
    output = _run("""
        import torch
        from mamlfast import memory_pool
        assert memory_pool.serve(torch.device("cpu"))
        MiB = 2**20

        def block(mib):
            return torch.empty(mib * MiB, dtype=torch.uint8)

        a, b, c = block(8), block(8), block(8)  # one 32 MiB segment, split three times
        base = a.data_ptr()
        assert (b.data_ptr(), c.data_ptr()) == (base + 8 * MiB, base + 16 * MiB)
        assert memory_pool.stats().segments == 1
        del a, b  # merged into one free block of 16 MiB
        d = block(16)
        assert d.data_ptr() == base
        e = block(12)  # 8 MiB are left in the first segment: a second one
        assert memory_pool.stats().segments == 2 and e.data_ptr() not in range(base, base + 32 * MiB)
        f = block(4)  # the first free block large enough, in the first segment
        assert f.data_ptr() == base + 24 * MiB
        del c, d, e, f
        assert memory_pool.stats().allocated == 0
        assert memory_pool.release() == 64 * MiB
        assert memory_pool.stats() == memory_pool.PoolStats(reserved=0, allocated=0, segments=0)
        print("ok")
    """)
    assert output.strip() == "ok"


def test_threads_and_fork(pool):
    output = _run("""
        import os, threading, torch
        from mamlfast import memory_pool
        assert memory_pool.serve(torch.device("cpu"))
        torch.set_num_threads(1)

        def churn(seed):
            generator = torch.Generator().manual_seed(seed)
            for _ in range(200):
                n = int(torch.randint(2**16, 2**21, (1,), generator=generator))
                x = torch.randn(n, generator=generator)
                assert torch.isfinite(x.sum())

        threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert memory_pool.stats().allocated == 0
        kept = torch.ones(2**20)
        child = os.fork()
        if child == 0:
            os._exit(0 if torch.ones(2**20).add(kept).sum().item() == 2 * 2**20 else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        print("ok")
    """)
    assert output.strip() == "ok"


HELD_SCRIPT = """
    import sys, torch, mamlfast
    from mamlfast.step import MetaStep, make_optimizer
    torch.set_num_threads(1)
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", recompute=sys.argv[1] == "recompute")
    torch.manual_seed(0)
    learner = mamlfast.MAMLPlusPlus(cfg)
    x = torch.randn(8, 5, 1, 28, 28)
    y = torch.arange(5).expand(8, 5).contiguous()
    batch = mamlfast.TaskBatch(x, y, x.clone(), y.clone())
    step = MetaStep(learner, make_optimizer(learner, cfg, torch.device("cpu")), cfg, torch.device("cpu"))

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) for line in lines if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as clear_refs:  # the high-water mark down to the resident size
        clear_refs.write("5")
    before = status("VmRSS")
    for _ in range(3):
        step(batch, epoch=50)
    print(status("VmHWM") - before)
"""


def test_a_recomputing_iteration_holds_under_half_the_resident_memory_of_one_without(pool):
    """The glibc heap kept most of what recomputed regions freed: 58% of the plain path's resident
    peak here (omniglot-5w1s, meta-batch 8, second order, fresh processes, no variables set)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pytest.skip("cannot reset the resident high-water mark (/proc/self/clear_refs)")
    held = {path: int(_run(HELD_SCRIPT, path)) for path in ("plain", "recompute")}
    assert held["recompute"] <= 0.45 * held["plain"], held
