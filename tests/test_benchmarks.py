"""The benchmarks' own correctness: the torch.func peer computes MAML++, and meta_step.py reports failures
as error rows and keeps what it measured."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import perturbed_learner, random_batch, relative_errors

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import meta_step  # noqa: E402
from func_peer import FuncMAMLPlusPlus  # noqa: E402

TINY = ["--preset", "omniglot-5w1s", "--tasks", "2", "--override", "image_size=16", "--override", "num_filters=4",
        "--repeats", "2", "--warmup", "1", "--no-memory", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    """meta_step.main sets torch's thread count (one thread: tiny shapes gain nothing from two)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("first_order_epochs, epoch", [(0, 3), (50, 4), (0, 60)],
                         ids=["second order with MSL", "first order with MSL", "second order after MSL"])
def test_func_peer_matches_the_reference(small_cfg, first_order_epochs, epoch):
    """Meta-loss, accuracy and every meta-gradient of the torch.func peer equal loop's, in training mode
    (loop's running-statistics updates do not enter its loss; the peer keeps none)."""
    cfg = small_cfg.replace(backend="loop", first_order_epochs=first_order_epochs)
    learner = perturbed_learner(cfg)
    peer = FuncMAMLPlusPlus(cfg).to(torch.float64).load_learner(learner)
    batch = random_batch(cfg, cfg.meta_batch_size)
    expected = learner(batch, epoch)
    expected.loss.backward()
    loss, accuracy = peer(batch, epoch)
    loss.backward()
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    assert accuracy.item() == pytest.approx(expected.accuracy.item())
    grads = {name: p.grad for name, p in peer.named_parameters()}
    assert set(grads) == {name for name, _ in learner.named_parameters()}
    errors = relative_errors({name: p.grad for name, p in learner.named_parameters()}, grads)
    assert max(errors.values()) < 1e-6, errors


def test_meta_step_reports_failures_as_error_rows(tmp_path):
    """Graphs asked for on the CPU and a backend that cannot run become error rows; the rest is timed."""
    result = meta_step.main(TINY + ["--backends", "torch,cuda,auto+graphs", "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(result))
    rows = {(row["backend"], row["graphs"]): row for row in result["rows"]}
    assert list(rows) == [("loop", False), ("func", False), ("torch", False), ("cuda", False), ("auto", True)]
    for key in [("loop", False), ("func", False), ("torch", False)]:
        row = rows[key]
        assert row["error"] is None and len(row["all_ms"]) == 2
        assert row["speedup_over_loop"] == pytest.approx(rows["loop", False]["median_ms"] / row["median_ms"])
        assert row["speedup_over_func"] == pytest.approx(rows["func", False]["median_ms"] / row["median_ms"])
    assert "BackendUnavailable: backend 'cuda' is not available" in rows["cuda", False]["error"]
    assert "CUDA graphs asked for, not replayed: CUDA graphs need a CUDA device" in rows["auto", True]["error"]
    assert all(rows[key]["median_ms"] is None for key in [("cuda", False), ("auto", True)])
    assert meta_step.failed(result)


def test_meta_step_keeps_what_it_measured_when_interrupted(monkeypatch):
    def interrupted_timing(functions, device, repeats, warmup, *, errors, times):
        times.update({name: [10.0] for name in functions if name != "torch"})
        raise KeyboardInterrupt

    monkeypatch.setattr(meta_step, "time_interleaved", interrupted_timing)
    result = meta_step.main(TINY + ["--backends", "torch"])
    assert result["interrupted"] and meta_step.failed(result)
    rows = {row["backend"]: row for row in result["rows"]}
    assert rows["loop"]["median_ms"] == 10.0 and rows["func"]["speedup_over_loop"] == 1.0
    assert rows["torch"]["error"] == "interrupted before it was timed"
