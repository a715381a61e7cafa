"""GraphedProduct: static-buffer logic on the CPU; the CUDA capture where a GPU is present."""
import pytest
import torch

from problems import cnn_problem
from spectra.graphed_product import GraphedProduct, padded_rows


def test_padded_rows_are_power_of_two_buckets_capped_at_the_batch():
    assert [padded_rows(n, None) for n in (1, 31, 32, 33, 100, 1077)] == [32, 32, 32, 64, 128, 2048]
    assert [padded_rows(n, 512) for n in (53, 300, 512)] == [64, 512, 512]
    assert padded_rows(600, 512) == 1024  # larger than the batch (cannot happen for cut batches): not capped


def _recording_fn(calls):
    def fn(tangents, x, y, real):
        calls.append((tangents["w"].data_ptr(), x.data_ptr()))
        return tangents["w"] * x.sum() + y.sum() + real.sum()
    return fn


def test_static_buffers_reused_per_signature_and_tangents_copied_once_per_block():
    calls = []
    product = GraphedProduct(_recording_fn(calls), capture=False)
    t1 = {"w": torch.ones(2, 3)}
    xa, xb = torch.ones(4, 2), 2 * torch.ones(4, 2)
    y, real = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool)
    out_a = product(t1, xa, y, real).clone()
    out_b = product(t1, xb, y, real).clone()
    torch.testing.assert_close(out_a, torch.full((2, 3), 8.0 + 4))
    torch.testing.assert_close(out_b, torch.full((2, 3), 16.0 + 4))
    assert calls[0] == calls[1]  # same static buffers (addresses), new contents
    assert calls[0][1] not in (xa.data_ptr(), xb.data_ptr())
    t2 = {"w": 3 * torch.ones(2, 3)}  # a new block of tangents is copied in
    torch.testing.assert_close(product(t2, xa, y, real), torch.full((2, 3), 24.0 + 4))
    product(t1, torch.ones(8, 2), torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.bool))
    assert len(product._slots) == 2 and product.num_captures == 0 and product.failed is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of a failed capture")
def test_a_failed_capture_falls_back_to_eager_products_with_a_warning():
    calls = []
    product = GraphedProduct(_recording_fn(calls), capture=True)  # capture on a CPU fails
    t = {"w": torch.ones(2, 3)}
    with pytest.warns(RuntimeWarning, match="disabled"):
        out = product(t, torch.ones(4, 2), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(out, torch.full((2, 3), 8.0 + 4))
    assert product.failed and not product._slots
    out = product(t, 2 * torch.ones(4, 2), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(out, torch.full((2, 3), 16.0 + 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_products_match_eager_products_on_a_gpu():
    problem = cnn_problem()
    eager = problem.operator(device="cuda", batch_size=8)
    graphed = problem.operator(device="cuda", batch_size=8, graphs=True)
    v = torch.randn(eager.dim, 4, dtype=torch.float64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for _ in range(2):  # first call captures, second replays
        torch.testing.assert_close(graphed @ v, eager @ v, rtol=1e-10, atol=1e-12)
    assert graphed._product.failed is None and graphed._product.num_captures >= 1


def test_fresh_tangent_dicts_are_always_copied_in():
    """A freed dict's id() is reused by the next one: only the same dict object may skip the copy."""
    product = GraphedProduct(lambda t, x, y, real: t["w"] * x.sum(), capture=False)
    x, y, real = torch.ones(4, 2), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool)
    for i in range(20):
        out = product({"w": torch.full((2, 3), float(i))}, x, y, real)
        torch.testing.assert_close(out, torch.full((2, 3), 8.0 * i))


class _Owner:
    pass


def _cycling_pool(size):
    """A stand-in for PyTorch's stream pool: hands out ``size`` streams round-robin."""
    counter = iter(range(10**6))
    return lambda: next(counter) % size


def test_capture_streams_are_distinct_per_live_owner_and_released_with_it():
    import gc

    from spectra.graphed_product import CaptureStreams

    streams = CaptureStreams(_cycling_pool(3), key=lambda s: s, tries=6)
    a, b, c = _Owner(), _Owner(), _Owner()
    got = [streams.lease(a), streams.lease(b), streams.lease(c)]
    assert sorted(got) == [0, 1, 2]  # the pool wrapped around, yet no two owners share one
    with pytest.raises(RuntimeError, match="no free CUDA stream"):
        streams.lease(_Owner())
    held_by_b = got[1]
    del b
    gc.collect()
    d = _Owner()
    assert streams.lease(d) == held_by_b  # a collected owner's stream is handed out again
    assert streams.held == {0, 1, 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphs_that_replay_concurrently_are_captured_on_different_streams():
    from spectra.graphed_product import CAPTURE_STREAMS

    owners = [_Owner() for _ in range(8)]
    streams = [CAPTURE_STREAMS.lease(o) for o in owners]
    assert len({s.cuda_stream for s in streams}) == 8
    plain = torch.cuda.Stream()  # replay streams come from the other pool
    assert plain.cuda_stream not in {s.cuda_stream for s in streams}
