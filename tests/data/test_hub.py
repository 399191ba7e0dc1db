"""Resolving Hub ids to a mirror folder or the Hub: removed ids, offline and unreachable Hub,
missing mirror entries, local folders, and tokenizers from a mirror."""

from __future__ import annotations

import shutil
import socket

import datasets
import pytest

from moe_emergence import hub
from moe_emergence.data.legacy import load_math_data
from moe_emergence.data.sources import MATH_TEMPLATE, Source, load_domain
from moe_emergence.data.tokenize import load_tokenizer
from moe_emergence.hub import HubUnavailableError, check_hub_reachable, resolve_repo


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("datasets.load_dataset must not be called")

    monkeypatch.setattr(datasets, "load_dataset", fail)


@pytest.fixture
def online(monkeypatch):
    """Both offline switches off; the caller points the endpoint somewhere local."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- removed datasets ----------------------------------------------------------------------


def test_removed_dataset_names_its_replacement(tmp_path):
    (tmp_path / "hendrycks" / "competition_math").mkdir(parents=True)  # even when mirrored
    for mirror in (None, tmp_path):
        with pytest.raises(ValueError, match="EleutherAI/hendrycks_math"):
            resolve_repo("hendrycks/competition_math", mirror)


def test_domain_reading_a_removed_dataset_fails_before_loading(tiny_mirror, no_loading):
    source = Source("hendrycks/competition_math", MATH_TEMPLATE, configs=("algebra",))
    with pytest.raises(ValueError, match="EleutherAI/hendrycks_math"):
        load_domain("math", [source], 1.0, hub_mirror=str(tiny_mirror), show_progress=False)


# --- offline / unreachable Hub -----------------------------------------------------------------


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_without_mirror_fails_at_once(monkeypatch, no_loading, switch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(switch, "1")
    with pytest.raises(HubUnavailableError) as excinfo:
        load_math_data(1.0, show_progress=False)
    assert isinstance(excinfo.value, ConnectionError)
    message = str(excinfo.value)
    assert "openai/gsm8k" in message
    assert "--hub-mirror" in message
    assert "offline" in message


def test_unreachable_hub_names_dataset_and_mirror_option(monkeypatch, online):
    port = closed_port()
    monkeypatch.setattr(hub, "_hub_endpoint", lambda: f"http://127.0.0.1:{port}")
    with pytest.raises(HubUnavailableError) as excinfo:
        check_hub_reachable("openai/gsm8k", timeout_s=2.0)
    message = str(excinfo.value)
    assert "openai/gsm8k" in message
    assert "--hub-mirror" in message
    assert f"127.0.0.1:{port}" in message


def test_unreachable_hub_fails_loading_before_any_dataset_is_opened(
    monkeypatch, online, no_loading
):
    port = closed_port()
    monkeypatch.setattr(hub, "_hub_endpoint", lambda: f"http://127.0.0.1:{port}")
    with pytest.raises(HubUnavailableError, match=r"openai/gsm8k.*--hub-mirror"):
        load_math_data(1.0, show_progress=False)


def test_reachable_hub_resolves_to_the_id_itself(monkeypatch, online):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(hub, "_hub_endpoint", lambda: f"http://127.0.0.1:{port}")
        assert resolve_repo("openai/gsm8k", None) == "openai/gsm8k"


@pytest.mark.parametrize(
    ("endpoint", "address"),
    [
        ("https://hub.example", ("hub.example", 443)),
        ("http://hub.example", ("hub.example", 80)),
        ("https://hub.example:8443/api", ("hub.example", 8443)),
    ],
)
def test_endpoint_port_defaults_to_the_scheme(monkeypatch, online, endpoint, address):
    seen = []

    def connect(addr, timeout):
        seen.append(addr)
        raise OSError("refused")

    monkeypatch.setattr(hub, "_hub_endpoint", lambda: endpoint)
    monkeypatch.setattr(hub.socket, "create_connection", connect)
    with pytest.raises(HubUnavailableError, match=f"{address[0]}:{address[1]}"):
        check_hub_reachable("openai/gsm8k")
    assert seen == [address]


# --- mirror folders ----------------------------------------------------------------------------


def test_mirror_lacking_a_dataset_says_where_it_looked_and_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_repo("openai/gsm8k", tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "openai" / "gsm8k") in message
    assert "hf download openai/gsm8k --repo-type dataset" in message
    assert "--hub-mirror" in message


def test_mirror_lacking_a_later_source_fails_before_loading(tmp_path, tiny_mirror, no_loading):
    """Every source of a domain is resolved before the first one is streamed."""
    shutil.copytree(tiny_mirror / "openai", tmp_path / "openai")  # GSM8K only, no MATH
    with pytest.raises(FileNotFoundError, match="EleutherAI/hendrycks_math"):
        load_math_data(1.0, hub_mirror=str(tmp_path), show_progress=False)


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_mirror_root_that_is_not_a_folder(tmp_path, kind):
    root = tmp_path / "mirror"
    if kind == "file":
        root.write_text("not a folder")
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_repo("openai/gsm8k", root)
    message = str(excinfo.value)
    assert str(root) in message
    assert "not a folder" in message
    assert "--hub-mirror" in message


def test_existing_local_folder_is_used_as_it_is(tiny_mirror, tmp_path):
    local = tiny_mirror / "openai" / "gsm8k"
    assert resolve_repo(str(local), None) == str(local)  # offline, no mirror: no Hub check
    assert resolve_repo(str(local), tmp_path) == str(local)  # not looked up in the mirror


def test_domain_source_given_as_a_local_folder_loads_offline(tiny_mirror):
    source = Source(str(tiny_mirror / "openai" / "gsm8k"), "{question}", configs=("main",))
    texts, meta = load_domain("math", [source], 1.0, show_progress=False)
    assert len(texts) == 30 and texts[0].startswith("Q0: ")
    assert meta["sources"][0]["location"] == str(tiny_mirror / "openai" / "gsm8k")


# --- tokenizers ----------------------------------------------------------------------------------


def test_tokenizer_from_mirror(tmp_path, monkeypatch, tiny_tokenizer_dir, tiny_tokenizer):
    mirror = tmp_path / "mirror"
    shutil.copytree(tiny_tokenizer_dir, mirror / "tok")
    monkeypatch.chdir(tmp_path)  # no ./tok here: the name must come from the mirror
    tokenizer = load_tokenizer("tok", hub_mirror=str(mirror))
    assert tokenizer.eos_token == "<|endoftext|>"
    sample = "def f(x):\n    return x + 1\n"
    assert tokenizer(sample)["input_ids"] == tiny_tokenizer(sample)["input_ids"]


def test_tokenizer_missing_from_mirror(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as excinfo:
        load_tokenizer("org/tok", hub_mirror=str(tmp_path))
    message = str(excinfo.value)
    assert str(tmp_path / "org" / "tok") in message
    assert "hf download org/tok --local-dir" in message  # a model repo: no --repo-type


def test_tokenizer_offline_without_mirror(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubUnavailableError, match=r"'gpt2'.*--hub-mirror"):
        load_tokenizer("gpt2")
