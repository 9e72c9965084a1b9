"""Tests of `pearl_edu.teaching.preflight`: the decision over fake machines, the measurements."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from pearl_edu.errors import PearlEduError
from pearl_edu.teaching import preflight
from pearl_edu.teaching.preflight import (
    GB,
    DiskSpace,
    Gpu,
    PreflightError,
    Requirements,
    Resources,
    decide,
    measure_resources,
    requirements,
)
from pearl_edu.teaching.toy import load_state_dict, make_tiny_model

OUTPUT = Path("/data/merged")
CACHE = Path("/data/hf-cache")
SAME_DISK = 1
OTHER_DISK = 2


def machine(
    *,
    free: int = 100 * GB,
    cache_free: int | None = None,
    ram: int = 32 * GB,
    gpus: tuple[Gpu, ...] = (),
    hub: bool = True,
) -> Resources:
    """A made-up machine; the cache is on the output's disk unless ``cache_free`` is given."""
    cache = (
        DiskSpace(cache_free, OTHER_DISK) if cache_free is not None else DiskSpace(free, SAME_DISK)
    )
    return Resources(
        disk={OUTPUT: DiskSpace(free, SAME_DISK), CACHE: cache},
        ram_available_bytes=ram,
        gpus=gpus,
        hub_reachable=hub,
    )


def full_run(**changes) -> Requirements:
    """Roughly what the real Pearl-7B run needs: 43.5 GB of downloads, a 14.5 GB output."""
    fields = {
        "disk_bytes": {OUTPUT: int(14.5 * GB), CACHE: int(43.5 * GB)},
        "ram_bytes": 4 * GB,
        "gpu_memory_bytes": 4 * GB,
        "device": "auto",
        "downloads": {"a/b": int(43.5 * GB)},
        "model_bytes": int(14.5 * GB),
    }
    return Requirements(**(fields | changes))


def failed(result: preflight.Preflight) -> list[str]:
    return [check.what for check in result.checks if not check.ok]


def test_a_big_enough_machine_passes():
    result = decide(full_run(), machine(gpus=(Gpu("big", 80 * GB),)))
    assert result.ok, result.table()
    result.raise_if_refused()  # does not raise


def test_folders_on_one_disk_share_its_free_space():
    # 60 GB free holds the output (14.5) or the cache (43.5) alone, but not both + margin.
    result = decide(full_run(), machine(free=59 * GB))
    assert failed(result) == [f"disk {OUTPUT} + {CACHE}"]
    with pytest.raises(PreflightError, match=r"disk .*merged.*hf-cache.*needs 60\.0 GB"):
        result.raise_if_refused()


def test_folders_on_two_disks_are_checked_separately():
    assert decide(full_run(), machine(free=20 * GB, cache_free=50 * GB)).ok
    result = decide(full_run(), machine(free=20 * GB, cache_free=40 * GB))
    assert failed(result) == [f"disk {CACHE}"]


def test_not_enough_ram_is_refused_with_advice():
    result = decide(full_run(model_bytes=0), machine(ram=2 * GB))
    assert failed(result) == ["RAM"]
    with pytest.raises(PreflightError) as error:
        result.raise_if_refused()
    message = str(error.value)
    assert "\n" not in message
    assert "RAM: needs 4.0 GB, has 2.0 GB available" in message
    assert "more memory" in message
    assert isinstance(error.value, PearlEduError)


def test_without_a_gpu_auto_and_cpu_pass_but_cuda_is_refused():
    assert decide(full_run(device="auto"), machine()).ok
    assert decide(full_run(device="cpu"), machine()).ok
    result = decide(full_run(device="cuda"), machine())
    assert failed(result) == ["GPU"]
    with pytest.raises(PreflightError, match="device = 'auto' or 'cpu'"):
        result.raise_if_refused()


def test_a_gpu_too_small_is_refused_only_when_asked_for():
    small = (Gpu("small", 2 * GB),)
    assert failed(decide(full_run(device="cuda"), machine(gpus=small))) == ["GPU memory"]
    assert decide(full_run(device="cuda"), machine(gpus=(Gpu("big", 24 * GB),))).ok
    assert decide(full_run(device="auto"), machine(gpus=small)).ok


def test_using_the_model_needs_a_big_gpu_or_enough_ram():
    needs = full_run()  # 14.5 GB of weights
    assert decide(needs, machine(ram=8 * GB, gpus=(Gpu("big", 24 * GB),))).ok
    refused = decide(needs, machine(ram=8 * GB, gpus=(Gpu("small", 8 * GB),)))
    assert failed(refused) == ["memory to use the model"]
    assert decide(needs, machine(ram=32 * GB)).ok  # on the CPU, slowly


def test_offline_downloads_are_refused_but_local_folders_are_not():
    result = decide(full_run(), machine(hub=False))
    assert failed(result) == ["Hugging Face Hub"]
    with pytest.raises(PreflightError, match="HF_HUB_OFFLINE"):
        result.raise_if_refused()
    local = full_run(downloads={}, disk_bytes={OUTPUT: GB})
    assert decide(local, machine(hub=False)).ok
    assert "Hugging Face Hub" not in [c.what for c in decide(local, machine()).checks]


def test_every_failure_is_named_in_one_line():
    result = decide(full_run(device="cuda"), machine(free=GB, ram=GB, hub=False))
    assert len(failed(result)) == 5
    with pytest.raises(PreflightError) as error:
        result.raise_if_refused()
    assert "\n" not in str(error.value)
    for what in failed(result):
        assert what in str(error.value)


@pytest.fixture
def empty_offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and offline mode: nothing is cached, nothing downloads."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    return tmp_path / "hf-home" / "hub"


def test_requirements_of_the_real_run_offline_come_from_the_model_cards(
    tmp_path, empty_offline_cache
):
    omnibeagle, wizardmath, published = preflight.KNOWN_DOWNLOAD_BYTES
    needs = requirements(
        [omnibeagle, wizardmath], tmp_path / "out", published=published, online=False
    )
    assert needs.download_source == "model cards"
    assert needs.downloads == preflight.KNOWN_DOWNLOAD_BYTES
    assert needs.disk_bytes[empty_offline_cache] == sum(preflight.KNOWN_DOWNLOAD_BYTES.values())
    assert needs.disk_bytes[tmp_path / "out"] == 2 * preflight.MISTRAL_7B_PARAMETERS
    assert needs.model_bytes == 2 * preflight.MISTRAL_7B_PARAMETERS
    # Mistral-7B's largest tensor is the 32000 x 4096 embedding matrix.
    assert needs.ram_bytes == preflight.merge_memory_bytes(32000 * 4096)


def test_an_unknown_repo_offline_has_no_size(tmp_path, empty_offline_cache):
    with pytest.raises(PreflightError, match="someone/unknown-7B: download size unknown"):
        requirements(["someone/unknown-7B"], tmp_path / "out", online=False)


def test_requirements_of_local_folders_are_read_from_their_headers(tmp_path):
    a = make_tiny_model(tmp_path / "a", hidden_size=32, intermediate_size=64, vocab_size=96)
    b = make_tiny_model(tmp_path / "b", base=a)
    needs = requirements([a, b], tmp_path / "out", device="cpu")
    assert needs.downloads == {} and needs.download_source == "none"
    parameters = sum(t.numel() for t in load_state_dict(a).values())
    assert needs.disk_bytes == {tmp_path / "out": 2 * parameters}
    assert needs.ram_bytes == preflight.merge_memory_bytes(96 * 32)  # the embeddings
    assert needs.gpu_memory_bytes == 0


def test_download_size_counts_only_the_files_the_download_fetches(monkeypatch):
    files = {
        "model-00001-of-00002.safetensors": 10 * GB,
        "model-00002-of-00002.safetensors": 4 * GB,
        "pytorch_model-00001-of-00002.bin": 9 * GB,  # the other format: skipped
        "config.json": 600,
        "tokenizer.model": 500_000,
        "images/chart.png": 80_000,  # not needed by a merge
    }
    siblings = [SimpleNamespace(rfilename=name, size=size) for name, size in files.items()]

    class FakeApi:
        def model_info(self, repo_id, files_metadata=False):
            assert files_metadata
            return SimpleNamespace(siblings=siblings)

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    size, source = preflight.download_size("a/b", online=True)
    assert (size, source) == (14 * GB + 600 + 500_000, "Hub listing")


def test_download_size_falls_back_on_the_model_cards_when_the_listing_fails(monkeypatch):
    class BrokenApi:
        def model_info(self, repo_id, files_metadata=False):
            raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.HfApi", BrokenApi)
    size, source = preflight.download_size("WizardLM/WizardMath-7B-V1.1")
    assert (size, source) == (int(14.48 * GB), "model cards")


def test_measure_resources_reads_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    not_yet = tmp_path / "not" / "made" / "yet"
    resources = measure_resources([tmp_path, not_yet])
    assert resources.hub_reachable is False
    assert resources.disk[tmp_path].free_bytes > 0
    assert resources.disk[not_yet] == resources.disk[tmp_path] or (
        resources.disk[not_yet].filesystem == resources.disk[tmp_path].filesystem
    )
    assert resources.ram_available_bytes > 0
    assert all(gpu.memory_bytes > 0 for gpu in resources.gpus)


def test_meminfo_fallback_is_between_zero_and_the_total_memory():
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < preflight._meminfo_available() <= total


def test_human_bytes():
    assert preflight.human_bytes(14.5 * GB) == "14.5 GB"
    assert preflight.human_bytes(2_400_384) == "2.4 MB"
    assert preflight.human_bytes(12) == "12 B"
