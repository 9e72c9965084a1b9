"""The device backend, run on CPU tensors: its logic, its dispatch, and no host syncs.

The device backend (`pearl_edu.backends.device`) is device-agnostic torch, written for a
GPU. Here it runs on the CPU: its SLERP agrees with the core to the contract
(``tests/test_contract.py`` checks the bound itself), its linear, task arithmetic, TIES
(the core's, ties at the cut by position) and DARE (the core's, on generators seeded as
the engine's) give the core's bits on CPU tensors, and none of its operations asks the
device for a value (no ``.item()``, no branch on a tensor, no boolean-mask indexing), which
on a GPU would stall the host once per tensor.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pearl_edu import contract, core, methods
from pearl_edu.backends import backend_for, cpu, device, reference
from pearl_edu.core.interpolation import DOT_THRESHOLD, slerp_weights
from pearl_edu.errors import ConfigError
from pearl_edu.ulp import same_bits, ulp_at_each

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CPU = torch.device("cpu")
# The aten operations that make the host wait for the device: reading a value back
# (`.item()`, `bool()`, `float()`, `if tensor:`) and sizing a result by its values
# (boolean-mask indexing goes through nonzero).
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}
# On the CPU these take a boolean mask directly; on a GPU they call nonzero first.
MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class NoHostSync(TorchDispatchMode):
    """Fails on any operation that would make a GPU's host wait for the device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNCING_OPS or (name in MASK_INDEXING and _has_bool_index(args)):
            raise AssertionError(f"host synchronisation: aten.{name}")
        return func(*args, **(kwargs or {}))


def models(shape, dtype, count=3, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base.to(dtype)] + [
        (base + scale * torch.randn(shape, generator=g)).to(dtype) for _ in range(count - 1)
    ]


def test_the_sync_detector_catches_item_branches_and_mask_indexing():
    x = torch.randn(10)
    with pytest.raises(AssertionError, match="_local_scalar_dense"), NoHostSync():
        x.sum().item()
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        x[x > 0] = 1
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        if x.sum() > 0:  # a branch on a value computed on the device
            pass


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slerp_and_lerp_ask_the_device_for_nothing(dtype):
    v0, v1 = models((64, 33), dtype, count=2, scale=0.5)
    near = (v0.float() * 1.0001).to(dtype)  # the linear fallback, chosen by torch.where
    backend = device.BACKEND
    with NoHostSync():
        results = [
            backend.slerp(v0, v1, 0.3),
            backend.slerp(v0, near, 0.3),
            backend.slerp(v0, torch.zeros_like(v0), 0.7),
            backend.lerp(v0, v1, 0.3),
            backend.slerp(v0[:0], v1[:0], 0.3),
        ]
        out = torch.empty_like(v0)
        assert backend.slerp(v0, v1, 0.3, out=out) is out
    assert all(r.dtype == dtype for r in results)
    assert same_bits(out, results[0])


@pytest.mark.parametrize("pruning", [None, "magnitude", "random"])
@pytest.mark.parametrize("rescale", [False, True])
def test_task_vector_methods_ask_the_device_for_nothing(pruning, rescale):
    base, *others = models((50, 40), torch.bfloat16)
    backend = device.BACKEND
    options = {"normalize": True, "scale": 0.9}
    with NoHostSync():
        if pruning is None:
            backend.task_arithmetic(base, others, [0.6, 0.4], **options)
        elif pruning == "magnitude":
            backend.ties(base, others, [0.6, 0.4], [0.5, 0.3], rescale=rescale, **options)
        else:
            for election in (False, True):  # dare_linear and dare_ties
                generators = device.device_generators(3, len(others), CPU)
                backend.dare(
                    base,
                    others,
                    [0.6, 0.4],
                    [0.5, 0.3],
                    generators,
                    sign_election=election,
                    rescale=rescale,
                    **options,
                )
        backend.linear([base, *others], [0.5, 0.3, 0.2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slerp_is_the_cores_up_to_the_order_of_its_sums(dtype):
    v0, v1 = models((300, 70), dtype, count=2, scale=0.5)
    for t in (0.0, 0.3, 0.5, 1.0):
        expected, got = core.slerp(v0, v1, t), device.slerp(v0, v1, t)
        assert got.dtype == dtype and got.shape == v0.shape
        # Within the contract (test_contract.py tries it on many more pairs).
        steps = (got.double() - expected.double()).abs() / ulp_at_each(
            contract.slerp_input_scale(v0, v1, t), dtype
        )
        assert steps.max() <= contract.CONTRACT_STEPS[dtype]
    # The fallback's weights are the core's: the same bits.
    near = (v0.double() * 1.0001).to(dtype)
    assert same_bits(device.slerp(v0, near, 0.3), core.slerp(v0, near, 0.3))
    assert same_bits(device.lerp(v0, v1, 0.3), core.lerp(v0, v1, 0.3))
    zeros = torch.zeros_like(v0)
    assert same_bits(device.slerp(zeros, zeros, 0.4), core.slerp(zeros, zeros, 0.4))


def test_slerp_weights_choose_the_fallback_with_where():
    for cos, t in ((0.2, 0.3), (0.9999, 0.3), (1.0, 0.5), (-1.0, 0.5), (-0.9999, 0.25)):
        w0, w1 = slerp_weights(torch.tensor(cos), t, DOT_THRESHOLD)
        if abs(cos) > DOT_THRESHOLD:
            t_ = torch.tensor(t)
            assert (w0, w1) == (1 - t_, t_), cos
        else:
            theta = torch.acos(torch.tensor(cos))
            assert torch.equal(w1, torch.sin(t * theta) / torch.sin(theta))
        assert torch.isfinite(w0) and torch.isfinite(w1)  # sin(theta) = 0 stays unused


def test_out_must_match_and_shapes_must_agree():
    v0, v1 = models((5, 4), torch.bfloat16, count=2)
    with pytest.raises(ValueError, match="contiguous"):
        device.slerp(v0, v1, 0.3, out=torch.empty((5, 4), dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous"):
        device.slerp(v0, v1, 0.3, out=torch.empty((4, 5), dtype=torch.bfloat16).t())
    with pytest.raises(ValueError, match="shapes differ"):
        device.slerp(v0, v1[:2], 0.3)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("rescale", [False, True])
def test_ties_is_the_cores_stable_ties(dtype, rescale):
    # bfloat16 deltas have many equal magnitudes: ties at the cut, kept first in the tensor.
    base, *others = models((97, 53), dtype)
    for densities in ([0.5, 0.3], [1.0, 0.0], [0.01, 0.99]):
        expected = core.ties(
            base, others, [0.6, 0.4], densities, rescale=rescale, stable=True, normalize=True
        )
        for stable in (True, False):  # asked or not, a device breaks ties by position
            got = device.BACKEND.ties(
                base, others, [0.6, 0.4], densities, rescale=rescale, normalize=True, stable=stable
            )
            assert same_bits(got, expected), (densities, stable)
        out = torch.empty_like(base)
        got = device.BACKEND.ties(base, others, [0.6, 0.4], densities, rescale=rescale, out=out)
        assert got is out and same_bits(out, expected), densities


def test_ties_keeps_nans_first_and_ties_by_position():
    # One model of weight 1 on a zero base: TIES is its trimmed task vector.
    delta = torch.tensor([1.0, -3.0, float("nan"), 3.0, 2.0, -3.0, 0.0, float("nan")])
    zero = torch.zeros_like(delta)
    for density in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875):
        expected = core.ties(zero, [delta], [1.0], [density], stable=True)
        assert same_bits(device.BACKEND.ties(zero, [delta], [1.0], [density]), expected), density
    # Every magnitude equal: the first ones are kept.
    flat = torch.full((10,), -2.0, dtype=torch.bfloat16)
    merged = device.BACKEND.ties(torch.zeros_like(flat), [flat], [1.0], [0.3])
    assert merged.nonzero().flatten().tolist() == [0, 1, 2]


@pytest.mark.parametrize("election", [False, True])
def test_dare_on_cpu_generators_is_the_cores_draw(election):
    base, *others = models((101, 37), torch.bfloat16)
    seed = 11
    expected = core.dare(
        base,
        others,
        [0.7, 0.5],
        [0.3, 0.6],
        reference.input_generators(seed, len(others)),
        sign_election=election,
        rescale=True,
    )
    got = device.BACKEND.dare(
        base,
        others,
        [0.7, 0.5],
        [0.3, 0.6],
        device.device_generators(seed, len(others), CPU),
        sign_election=election,
        rescale=True,
    )
    assert same_bits(got, expected)


def test_task_arithmetic_and_linear_are_the_cores():
    base, *others = models((40, 30), torch.float16)
    expected = core.task_arithmetic(base, others, [0.3, 0.8], scale=0.5)
    got = device.BACKEND.task_arithmetic(base, others, [0.3, 0.8], scale=0.5)
    assert same_bits(got, expected)
    mixed = [base, others[0].to(torch.bfloat16), others[1]]
    for normalize in (False, True):
        assert same_bits(
            device.BACKEND.linear(mixed, [0.2, 0.3, 0.5], normalize=normalize),
            core.linear(mixed, [0.2, 0.3, 0.5], normalize=normalize),
        )


def test_device_generators_are_seeded_as_the_engines():
    for generators in (
        device.device_generators(5, 3, CPU),
        device.BACKEND.generators(5, 3, CPU),
    ):
        assert [g.initial_seed() for g in generators] == [5, 6, 7]
        assert [g.device.type for g in generators] == ["cpu"] * 3
    assert [g.initial_seed() for g in reference.input_generators(5, 3)] == [5, 6, 7]


def test_backend_for_gives_the_device_backend_on_cuda_and_on_the_cpu_only_when_asked():
    assert backend_for("cpu") is cpu.BACKEND
    assert backend_for("cpu", "auto") is cpu.BACKEND
    assert backend_for(torch.device("cuda", 1)) is device.BACKEND
    assert backend_for("cuda", "cpu") is cpu.BACKEND
    assert backend_for("cpu", "cpu") is cpu.BACKEND
    assert backend_for("cpu", "device") is device.BACKEND
    assert backend_for("cuda", "reference") is reference.BACKEND
    assert backend_for("meta") is cpu.BACKEND  # not a GPU: the host-copy path, as before
    assert backend_for("cuda").name == "device" and backend_for("cpu").name != "device"
    assert backend_for("cpu", "device").name == "device"
    for name in ("exact", "fast"):
        with pytest.raises(ConfigError, match="not understood"):
            backend_for("cpu", name)


@pytest.mark.parametrize("method", ["slerp", "linear", "ties", "dare_ties", "task_arithmetic"])
def test_merge_tensor_hands_the_backend_on(method):
    tensors = models((30, 20), torch.bfloat16, count=3 if method != "slerp" else 2, scale=0.3)
    params = {"t": 0.4} if method == "slerp" else {}
    rows = None
    if method == "linear":
        rows = [{"weight": w} for w in (0.5, 0.3, 0.2)]
        params = {"normalize": 1.0}
    elif method != "slerp":
        rows = [{}, {"weight": 0.6, "density": 0.4}, {"weight": 0.4, "density": 0.7}]
        params = {"normalize": 1.0, "lambda": 1.0, "rescale": 0.0, "int8_mask": 0.0}
        params["rescale"] = float(method.startswith("dare"))
    options = dict(input_params=rows, seed=9, name="x", fast_trim=True)
    exact = methods.merge_tensor(method, tensors, 0, params, **options)
    on_dev = methods.merge_tensor(method, tensors, 0, params, backend="device", **options)
    if method == "slerp":
        assert same_bits(on_dev, device.slerp(tensors[0], tensors[1], 0.4))
    else:
        # On CPU tensors the device backend's other methods give the core's bits.
        assert same_bits(on_dev, exact), method


# --------------------------------------------------------------------------------------
# The GPU path's plumbing, with copies that land late standing in for CUDA's streams.


class Landed:
    """An event standing in for a CUDA event: done once its copies' threads are."""

    def __init__(self, threads):
        self.threads = threads

    def synchronize(self):
        for thread in self.threads:
            thread.join()


class LateTransfers:
    """`CudaTransfers`' interface on the CPU, each copy landing a while after it is queued.

    An upload reads its pinned buffer only when it lands, and a download fills the output
    buffer only then: a reader that refilled a buffer too early, or a writer that did not
    wait for a download, would write other values than the merge computed.
    """

    def __init__(self, delay: float = 0.01):
        self.delay = delay
        self.pending: list = []
        self.downloads = 0

    def _later(self, copy):
        import threading
        import time

        thread = threading.Thread(target=lambda: (time.sleep(self.delay), copy()))
        thread.start()
        return thread

    def upload(self, tensor, dtype):
        target = torch.full(tensor.shape, float("nan"), dtype=dtype or tensor.dtype)
        self.pending.append(self._later(lambda: target.copy_(tensor)))
        return target

    def mark(self):
        landed, self.pending = Landed(self.pending), []
        return landed

    def use(self, tensors, uploaded):
        uploaded.synchronize()

    def download(self, tensor, host):
        self.downloads += 1
        return Landed([self._later(lambda: host.copy_(tensor))])


@pytest.fixture(scope="module")
def pearl_pair(tmp_path_factory):
    """Pearl's case at toy size: a float16 parent and a bfloat16 one."""
    from pearl_edu.teaching.toy import make_tiny_model

    root = tmp_path_factory.mktemp("pair")
    a = make_tiny_model(root / "a", num_layers=2, dtype=torch.float16)
    b = make_tiny_model(root / "b", base=a, noise=0.5, seed=2)
    return a, b


def slerp_config(a, b) -> str:
    return (
        f"models:\n  - model: {a}\n  - model: {b}\n"
        f"merge_method: slerp\nbase_model: {a}\nparameters:\n  t: [0, 0.4, 1]\n"
        "dtype: bfloat16\n"
    )


def test_the_writer_waits_for_each_download_and_the_math_for_each_upload(
    pearl_pair, tmp_path, monkeypatch
):

    import pearl_edu.engine as merge_module
    from pearl_edu.verification import verify

    config = slerp_config(*pearl_pair)
    plain = merge_module.merge(config, tmp_path / "plain", device="cpu", backend="device")
    late = LateTransfers()
    monkeypatch.setattr(merge_module, "transfers_for", lambda device: late)
    streamed = merge_module.merge(config, tmp_path / "late", device="cpu", backend="device")
    assert late.downloads == streamed.num_tensors  # every result came down as a copy
    report = verify(plain.output_dir, streamed.output_dir)
    assert report.identical, report.summary()


def test_a_buffer_set_is_refilled_only_after_its_uploads():
    from pearl_edu.read_ahead import BufferSet

    waited = []

    class Event:
        def synchronize(self):
            waited.append(True)

    buffers = BufferSet(16, pinned=False)
    buffers.wait_for_uploads()  # nothing uploaded yet: nothing to wait for
    buffers.uploaded = Event()
    buffers.wait_for_uploads()
    assert waited == [True] and buffers.uploaded is None


def test_transfers_are_plain_copies_without_cuda():
    from pearl_edu.read_ahead import transfers_for

    assert transfers_for(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert transfers_for(torch.device("cuda", 0)) is None


# --------------------------------------------------------------------------------------
# --device auto's rule, --backend cpu (or --exact), and what the merge prints.


def test_auto_merges_on_the_cpu_until_a_gpu_run_is_recorded(monkeypatch):
    from pearl_edu.devices import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choice = choose_device("auto", "ties")
    assert choice.device.type == "cpu" and "no CUDA GPU" in choice.reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for method in (*methods.METHODS, None):
        choice = choose_device("auto", method)  # the package's record: no run on a GPU yet
        assert choice.device.type == "cpu", method
        assert choice.reason.startswith("auto: ") and "not yet run on a GPU" in choice.reason
    given = choose_device("cuda:0", "slerp")
    assert given.device == torch.device("cuda", 0) and given.reason == "--device cuda:0"


def test_merge_command_prints_the_device_and_why_and_takes_backend_cpu_or_exact(
    pearl_pair, tmp_path, capsys
):
    from pearl_edu.cli import main

    config = tmp_path / "slerp.yml"
    config.write_text(slerp_config(*pearl_pair))
    assert main(["merge", str(config), str(tmp_path / "a"), "--quiet"]) == 0
    out = capsys.readouterr().out
    expected = "no CUDA GPU" if not torch.cuda.is_available() else "not yet run on a GPU"
    assert "(auto: " in out and expected in out
    assert main(["merge", str(config), str(tmp_path / "b"), "--quiet", "--exact", "-v"]) == 0
    assert "the cpu backend (--backend cpu)" in capsys.readouterr().err
    argv = ["merge", str(config), str(tmp_path / "c"), "--quiet", "--backend", "cpu", "-v"]
    assert main(argv) == 0
    assert "the cpu backend (--backend cpu)" in capsys.readouterr().err
    from pearl_edu.verification import verify

    assert verify(tmp_path / "a", tmp_path / "b").identical  # the CPU's bits either way
    assert verify(tmp_path / "a", tmp_path / "c").identical
