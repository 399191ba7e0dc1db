"""The frozen sample corpus: fixed content, pinned by fingerprint; the snapshot equals the live
readers on the machine that built it; its limits and its integrity check."""

from __future__ import annotations

import platform
import shutil

import pytest

from moe_emergence.data.sample import corpus as sample
from moe_emergence.data.sample import freeze, frozen
from moe_emergence.data.sample.corpus import load_sample_domain, sample_identity
from moe_emergence.errors import UserError

# The study's and the demo's budget (0.5 MiB a domain), seed 0. A change here changes the data
# of every sample run: rebuild on purpose, bump SAMPLE_VERSION, re-run what quotes it.
FINGERPRINT = {
    "code": (133, "9c19c5da7427dc9378c0201f67a97913aa804c32f6bb909695a777b05184b99a"),
    "math": (2021, "3f97bd35b0b8fe93b56cb372e824cfaaa9410f7c4c27ed11360910b75145ddf2"),
    "prose": (167, "e59c64697e11aaf85ee67dc0b617eb3aef72424a2288742d41bcee68dcd8ddee"),
}
FILES = {
    "python-stdlib": "12836de564ea8a0fafe0e9c75c5d8ac085912f375f46e3cf5103b3bded4a0dea",
    "python-docs": "9416f25fb3e5e2c8270b45e81b6b30df1555ace91993967eb5738ab1b40b5df8",
    "package-descriptions": "57212ed72bb5022b04e93d87a4deb90b2ff34f5449456f9774785416eae84ee5",
}


def _builds_here() -> bool:
    """Whether this machine is the snapshot's: same Python and installed distributions."""
    built = frozen.manifest()["built_with"]
    digest = sample._distributions_digest(sample.installed_distributions())
    return built["python"] == platform.python_version() and built["distributions_digest"] == digest


def test_fingerprint_of_the_study_budget():
    sample.domain_identity.cache_clear()
    identity = sample_identity(0.5)
    assert {d: (i["num_texts"], i["texts_sha256"]) for d, i in identity.items()} == FINGERPRINT
    assert {n: e["sha256"] for n, e in frozen.manifest()["files"].items()} == FILES
    for name in FILES:
        assert frozen.file_sha256(frozen.frozen_file(name)) == FILES[name]


def test_snapshot_sizes_cover_the_study():
    files = frozen.manifest()["files"]
    assert files["python-stdlib"]["chars"] >= frozen.CODE_CHARS
    assert files["python-docs"]["chars"] + files["package-descriptions"]["chars"] > 0.6 * 2**20
    for domain in ("code", "prose"):
        assert load_sample_domain(domain, 0.5)[1]["budget_met"] is True


@pytest.mark.skipif(not _builds_here(), reason="not the snapshot's Python and packages")
@pytest.mark.parametrize("domain,size_mb", [("code", 1.0), ("prose", 2.0)])
def test_snapshot_equals_the_live_readers_where_it_was_built(domain, size_mb):
    frozen_texts, _ = load_sample_domain(domain, size_mb, quiet=True)
    live_texts, _ = load_sample_domain(
        domain, size_mb, quiet=True, sources=sample.live_sources(domain)
    )
    assert frozen_texts == live_texts
    # A tighter filter reads further: the snapshot may run out first (it ends where the code's
    # CODE_CHARS do at the default filter), so it gives a prefix of what the live reader gives.
    short, meta = load_sample_domain(domain, size_mb, max_example_chars=500, quiet=True)
    live_short, _ = load_sample_domain(
        domain, size_mb, max_example_chars=500, quiet=True, sources=sample.live_sources(domain)
    )
    assert short and short == live_short[: len(short)]
    assert meta["budget_met"] or domain == "prose" or len(short) < len(live_short)


@pytest.mark.skipif(not _builds_here(), reason="not the snapshot's Python and packages")
def test_freeze_rebuilds_the_shipped_files_byte_for_byte(tmp_path):
    manifest = freeze.freeze(tmp_path)
    assert {n: e["sha256"] for n, e in manifest["files"].items()} == FILES


def test_longer_texts_than_the_snapshot_holds_are_refused():
    with pytest.raises(ValueError, match=r"max_example_chars=10001.*<= 10000"):
        load_sample_domain("code", 0.01, max_example_chars=10_001)
    live, _ = load_sample_domain(
        "code", 0.01, max_example_chars=10_001, sources=sample.live_sources("code")
    )
    assert live


@pytest.fixture
def copied_snapshot(tmp_path, monkeypatch):
    folder = tmp_path / "frozen"
    shutil.copytree(frozen.FROZEN_DIR, folder)
    monkeypatch.setattr(frozen, "FROZEN_DIR", folder)
    frozen.manifest.cache_clear()
    frozen.frozen_rows.cache_clear()
    yield folder
    frozen.manifest.cache_clear()
    frozen.frozen_rows.cache_clear()


def test_a_changed_snapshot_file_is_refused(copied_snapshot):
    path = copied_snapshot / "python-docs.jsonl.xz"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"python-docs.jsonl.xz is missing or does not match"):
        load_sample_domain("prose", 0.01)
    (copied_snapshot / "manifest.json").unlink()
    frozen.manifest.cache_clear()
    with pytest.raises(UserError, match="frozen sample corpus is missing"):
        load_sample_domain("code", 0.01)
