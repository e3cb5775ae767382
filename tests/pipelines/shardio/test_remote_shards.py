"""Training shards behind URLs and commands: listed by their store (gaps counted), fetched once per
read with retries, and split into exactly the bytes the same shards on local disk give."""

import functools
import http.server
import threading

import pytest

from pipelines.core.config import load_config
from pipelines.core.manifest import file_sha256, read_manifest
from pipelines.core.shard_url import ShardURL
from pipelines.run.stages import run_stage, stage_done
from pipelines.shardio import remote, remote_shards
from pipelines.shardio.remote import RemoteError
from pipelines.shardio.remote_shards import fetch, list_shards
from pipelines.shardio.shards import iter_samples, select_shards

from conftest import upload


def samples_of(shard) -> list[tuple[str, dict]]:
    return [(s.key, s.files) for s in iter_samples(shard)]


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(remote.time, "sleep", lambda seconds: None)


def test_a_pipe_command_is_read_as_the_shard_it_prints(tiny_data):
    local = tiny_data / "train" / "00001.tar"
    [shard], missing = list_shards(f"pipe:cat {tiny_data / 'train'}/{{00001..00001}}.tar")
    assert missing == [] and shard.name == "00001.tar"
    assert samples_of(shard) == samples_of(local)


def test_a_command_that_fails_once_is_run_again(tiny_data, tmp_path, no_backoff):
    marker = tmp_path / "failed-once"
    command = f"pipe:test -f {marker} && cat {tiny_data / 'train' / '00000.tar'} || (touch {marker}; exit 3)"
    assert samples_of(ShardURL(command)) == samples_of(tiny_data / "train" / "00000.tar")
    assert marker.is_file()


def test_a_command_that_keeps_failing_is_an_error_naming_it_and_its_stderr(no_backoff):
    with pytest.raises(RemoteError, match=r"pipe:echo broken >&2; exit 2.*failed 4 times.*status 2: broken"):
        fetch(ShardURL("pipe:echo broken >&2; exit 2"))


def test_fewer_bytes_than_the_listing_said_is_a_cut_transfer_retried_then_reported(tiny_data, no_backoff):
    shard = tiny_data / "train" / "00000.tar"
    cut = ShardURL(f"pipe:head -c 1000 {shard}", size=shard.stat().st_size, version="v1")
    with pytest.raises(RemoteError, match="got 1000 bytes, the listing said"):
        fetch(cut)


def test_a_shard_fetched_ahead_is_the_copy_every_read_of_the_split_takes(tiny_data, tmp_path):
    from experts.split.shard import prefetch
    from pipelines.shardio.remote_shards import held
    from pipelines.shardio.tar_read import index_plain_tar

    runs = tmp_path / "runs"
    shard = ShardURL(f"pipe:echo run >> {runs}; cat {tiny_data / 'train' / '00000.tar'}")
    prefetch(shard)
    with held(shard):
        assert index_plain_tar(shard) is not None
        assert samples_of(shard) == samples_of(tiny_data / "train" / "00000.tar")
    assert runs.read_text() == "run\n"  # fetched once, ahead


def test_a_remote_shard_is_identified_by_its_listed_size_and_version_not_its_url():
    a, b = ShardURL("s3://a/00000.tar", 10, "etag1"), ShardURL("s3://b/00000.tar", 10, "etag1")
    assert a.identity == b.identity != ShardURL("s3://a/00000.tar", 10, "etag2").identity
    assert ShardURL("https://h/00000.tar", 10).identity != ShardURL("https://g/00000.tar", 10).identity


@pytest.fixture
def http_folder(tiny_data):
    """The tiny set's training shards served over HTTP on loopback (a folder listing fsspec can read)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_data / "train"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_https_shards_are_listed_with_their_gaps_and_read_as_on_disk(http_folder, tiny_data):
    found, missing = select_shards(f"{http_folder}/{{00000..00003}}.tar", "skip")
    assert [s.name for s in found] == ["00000.tar", "00001.tar", "00002.tar"]
    assert missing == [f"{http_folder}/00003.tar"]
    assert all(s.size == (tiny_data / "train" / s.name).stat().st_size for s in found)
    assert samples_of(found[2]) == samples_of(tiny_data / "train" / "00002.tar")


@pytest.mark.slow
def test_embed_and_split_from_s3_give_the_local_runs_bytes_and_the_run_verifies(s3, tiny_run, tiny_data, tmp_path,
                                                                                monkeypatch):
    """The trainer reads only the run's expert shards (local, or on the run's shared filesystem):
    byte-identical to the local run's, they train its models bit for bit (test_determinism)."""
    from experts.split.verify import verify_split

    if not s3.exists("shards"):
        s3.mkdir("shards")
    upload(s3, tiny_data / "train", "shards/train")
    pattern = "s3://shards/train/{00000..00003}.tar"  # the tiny set has 3 shards: 00003 is a gap
    cfg = load_config(tiny_run["config"], overrides={"data": {"train_shards": pattern}})
    run, local = tmp_path / "run", tiny_run["run_dir"]
    embed = run_stage("embed", cfg, run)
    for stage in ("cluster", "split"):
        run_stage(stage, cfg, run)
    assert embed["missing_shards"] == ["s3://shards/train/00003.tar"]
    split = read_manifest(run / "split")
    assert split["input_shards"] == [f"s3://shards/train/0000{i}.tar" for i in range(3)]
    assert split["counts"]["samples_in"] == read_manifest(local / "split")["counts"]["samples_in"]
    for folder, pattern in (("embed", "*.parquet"), ("split", "expert_*/*")):
        mine = {p.relative_to(run): file_sha256(p) for p in sorted(run.glob(f"{folder}/{pattern}"))}
        theirs = {p.relative_to(local): file_sha256(p) for p in sorted(local.glob(f"{folder}/{pattern}"))}
        assert mine and mine == theirs, folder
    problems, summary = verify_split(run)
    assert problems == [] and summary["samples_in"] == split["counts"]["samples_in"]
    assert all(stage_done(stage, cfg, run) for stage in ("embed", "cluster", "split"))  # a rerun skips
    # verify from the embed stage's records: the inputs listed again, not a byte of them fetched
    monkeypatch.setattr(remote_shards, "fetch", lambda shard: pytest.fail(f"{shard} was fetched"))
    assert verify_split(run, "recorded") == (problems, summary)
    s3.pipe("shards/train/00001.tar", (tiny_data / "train" / "00002.tar").read_bytes())  # replaced since
    assert verify_split(run, "recorded")[0] == [
        "input shard s3://shards/train/00001.tar is not the one the split read (its listed size and version "
        "changed): verify it with --inputs read, or rerun from the embed stage"]
