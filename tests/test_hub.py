"""Model references: local folders as they are, repo ids through the HF cache, no network."""

from __future__ import annotations

import pytest

from pearl_edu.errors import HubError, ModelError
from pearl_edu.hub import looks_like_repo_id, resolve_model


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """HF_HOME in a temporary folder and offline mode: nothing can be downloaded."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def test_local_folder_is_returned_resolved(tmp_path):
    (tmp_path / "model").mkdir()
    assert resolve_model(tmp_path / "model") == (tmp_path / "model").resolve()
    assert resolve_model(str(tmp_path / "model")) == (tmp_path / "model").resolve()


def test_missing_local_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(tmp_path / "absent")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("./absent/model")


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(tmp_path / "weights.bin")


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("mlabonne/OmniBeagle-7B", True),
        ("WizardLM/WizardMath-7B-V1.1", True),
        ("./org/name", False),
        ("/abs/path", False),
        ("~/models/x", False),
        ("just-a-name", False),
        ("a/b/c", False),
    ],
)
def test_repo_ids_are_told_from_paths(ref, expected):
    assert looks_like_repo_id(ref) is expected


def test_offline_and_not_cached_is_a_hub_error_naming_the_repo(offline_empty_cache):
    with pytest.raises(HubError) as err:
        resolve_model("mlabonne/OmniBeagle-7B")
    message = str(err.value)
    assert "mlabonne/OmniBeagle-7B" in message
    assert "offline" in message and "local folder" in message and "\n" not in message


def test_offline_uses_a_cached_snapshot(offline_empty_cache):
    # The layout huggingface_hub itself keeps: refs/main names the snapshot folder.
    repo = offline_empty_cache / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert resolve_model("org/tiny") == snapshot


def test_hub_reachable_is_false_offline(monkeypatch):
    import socket

    from pearl_edu.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False

    # With offline mode off, an endpoint nobody listens on is unreachable too.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    assert hub_reachable(timeout=1.0) is False


def _cached_snapshots(cache, repo_name, commits):
    """Snapshots in the layout huggingface_hub keeps; refs/main names the last one."""
    repo = cache / f"models--org--{repo_name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commits[-1])
    for commit in commits:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    return repo / "snapshots"


def test_a_revision_pins_the_snapshot(offline_empty_cache):
    old, new = "1" * 40, "2" * 40
    snapshots = _cached_snapshots(offline_empty_cache, "tiny", [old, new])
    assert resolve_model("org/tiny") == snapshots / new
    assert resolve_model("org/tiny", revision=old) == snapshots / old
    # mergekit's spelling in a config: the revision after an "@".
    assert resolve_model(f"org/tiny@{old}") == snapshots / old


def test_fetch_passes_the_revision_on(offline_empty_cache):
    from pearl_edu.teaching import fullrun

    old, new = "3" * 40, "4" * 40
    snapshots = _cached_snapshots(offline_empty_cache, "tiny", [old, new])
    assert fullrun.fetch("org/tiny", revision=old) == snapshots / old


def test_an_uncached_revision_offline_names_the_revision(offline_empty_cache):
    _cached_snapshots(offline_empty_cache, "tiny", ["5" * 40])
    with pytest.raises(HubError) as err:
        resolve_model("org/tiny", revision="6" * 40)
    message = str(err.value)
    assert "org/tiny at revision " + "6" * 40 in message and "\n" not in message


def test_an_at_sign_in_a_missing_path_is_not_a_revision(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "absent@v1"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("org/name@")
