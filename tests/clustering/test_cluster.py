"""Stage 2: every embedded sample gets one fine cluster and one expert."""

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from clustering.cluster import top_terms
from clustering.embeddings import embedding_table
from clustering.kmeans import normalize_rows
from pipelines.core.config import ClusterConfig
from pipelines.core.manifest import atomic_path, combine, hash_outputs, write_manifest
from pipelines.run.stages import run_section


def run_cluster(cfg, embed_dir, cluster_dir):
    """The cluster stage alone, in the run folder that holds both (as a run lays them out)."""
    assert embed_dir.parent == cluster_dir.parent and cluster_dir.name == "cluster"
    return run_section("cluster", cfg, embed_dir.parent)


def fake_embed_stage(stage_dir, vectors, captions):
    """An embed stage's files for given vectors, as run_embed would write them."""
    stage_dir.mkdir(parents=True)
    keys = [f"k{i:05d}" for i in range(len(vectors))]
    with atomic_path(stage_dir / "00000.parquet") as tmp:
        pq.write_table(embedding_table(keys, "00000", captions, vectors), tmp)
    write_manifest(stage_dir, stage="embed", fingerprint=combine(vectors.tobytes().hex()[:64], len(vectors)),
                   config_hash="x", inputs={}, outputs=hash_outputs(stage_dir, [stage_dir / "00000.parquet"]),
                   counts={}, started=time.time(), extra={"shards": ["00000"]})
    return keys


def topics(n_per_topic=100, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(4, dim)) * 2
    words = ["circle square", "digit seven", "stripes texture", "forest trees"]
    x = np.concatenate([means[t] + rng.normal(size=(n_per_topic, dim)) * 0.5 for t in range(4)])
    captions = [words[t] for t in range(4) for _ in range(n_per_topic)]
    return normalize_rows(x.astype(np.float32)), captions, np.repeat(np.arange(4), n_per_topic)


def test_every_sample_lands_in_exactly_one_expert(tmp_path):
    x, captions, _ = topics()
    keys = fake_embed_stage(tmp_path / "embed", x, captions)
    manifest = run_cluster(ClusterConfig(num_fine=16, num_experts=4, niter=10), tmp_path / "embed",
                           tmp_path / "cluster")
    table = pq.read_table(tmp_path / "cluster" / "assignments.parquet").to_pydict()
    assert sorted(table["key"]) == keys
    assert set(table["expert"]) == {0, 1, 2, 3}
    expert_of_fine = np.load(tmp_path / "cluster" / "expert_of_fine.npy")
    assert [expert_of_fine[f] for f in table["fine"]] == table["expert"]
    assert sum(manifest["counts"]["experts"]) == len(keys)


def test_experts_follow_topics_and_report_their_terms(tmp_path):
    x, captions, topic = topics()
    fake_embed_stage(tmp_path / "embed", x, captions)
    run_cluster(ClusterConfig(num_fine=16, num_experts=4, niter=10), tmp_path / "embed", tmp_path / "cluster")
    expert = np.array(pq.read_table(tmp_path / "cluster" / "assignments.parquet").column("expert"))
    for t in range(4):  # each topic lives in one expert
        assert len(set(expert[topic == t])) == 1
    report = json.loads((tmp_path / "cluster" / "report.json").read_text())
    assert report["expert_size_ratio"] == pytest.approx(1.0)
    assert sorted(" ".join(sorted(t)) for t in report["expert_top_terms"]) == sorted(
        " ".join(sorted(w.split())) for w in ["circle square", "digit seven", "stripes texture", "forest trees"])


def test_more_fine_clusters_than_samples_fails_clearly(tmp_path):
    x, captions, _ = topics(n_per_topic=2)
    fake_embed_stage(tmp_path / "embed", x, captions)
    with pytest.raises(ValueError, match="num_fine=16 is more than the 8 embedded samples"):
        run_cluster(ClusterConfig(num_fine=16, num_experts=2), tmp_path / "embed", tmp_path / "cluster")


def test_empty_data_fails_clearly(tmp_path):
    fake_embed_stage(tmp_path / "embed", np.zeros((0, 8), np.float32), [])
    with pytest.raises(ValueError, match="no embedded samples"):
        run_cluster(ClusterConfig(num_fine=4, num_experts=2), tmp_path / "embed", tmp_path / "cluster")


def test_missing_upstream_stage_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the 'embed' stage first"):
        run_cluster(ClusterConfig(num_fine=4, num_experts=2), tmp_path / "embed", tmp_path / "cluster")


def test_top_terms_prefer_words_typical_of_the_cluster():
    terms = top_terms(["red circle"] * 5 + ["blue square"] * 5, np.array([0] * 5 + [1] * 5), 2)
    assert set(terms[0]) == {"red", "circle"} and set(terms[1]) == {"blue", "square"}


def test_fit_on_a_sample_still_assigns_every_file_in_order(tmp_path):
    x, captions, _ = topics()
    stage = tmp_path / "embed"
    stage.mkdir()
    keys, outputs = [], []
    for f, rows in enumerate([slice(0, 150), slice(150, 400)]):  # two shards of unequal size
        shard_keys = [f"s{f}k{i:04d}" for i in range(rows.stop - rows.start)]
        keys += shard_keys
        path = stage / f"{f:05d}.parquet"
        pq.write_table(embedding_table(shard_keys, f"{f:05d}", captions[rows], x[rows]), path)
        outputs.append(path)
    write_manifest(stage, stage="embed", fingerprint="two-files", config_hash="x", inputs={},
                   outputs=hash_outputs(stage, outputs), counts={}, started=time.time(),
                   extra={"shards": ["00000", "00001"]})
    run_cluster(ClusterConfig(num_fine=8, num_experts=2, niter=10, sample_size=120), stage, tmp_path / "cluster")
    table = pq.read_table(tmp_path / "cluster" / "assignments.parquet").to_pydict()
    assert table["key"] == keys
    assert table["shard"] == ["00000"] * 150 + ["00001"] * 250
    report = json.loads((tmp_path / "cluster" / "report.json").read_text())
    assert report["fit_sample"] == 120 and report["samples"] == 400
    assert sum(report["fine_sizes"]) == 400
    assert (tmp_path / "cluster" / "cluster_sizes.png").stat().st_size > 0


def test_fine_clusters_fitted_on_all_data_stay_balanced_after_assignment(tmp_path):
    x, captions, _ = topics(n_per_topic=250)
    fake_embed_stage(tmp_path / "embed", x, captions)
    run_cluster(ClusterConfig(num_fine=32, num_experts=4, niter=10), tmp_path / "embed", tmp_path / "cluster")
    report = json.loads((tmp_path / "cluster" / "report.json").read_text())
    assert min(report["fine_sizes"]) > 0
    assert report["fine_imbalance_all"] == pytest.approx(report["fine_imbalance_on_sample"])
    assert report["fine_imbalance_all"] < 1.02  # within the balanced fit's capacity (1.05 x the mean)


def test_assignment_inertia_does_not_depend_on_the_thread_count(tmp_path):
    # FAISS's similarities differ in their last bits between 1 and 2 threads (measured); a Dask
    # worker's one thread then wrote another report.json than this host's two
    import faiss

    from clustering.assign import nearest_centres

    rng = np.random.default_rng(0)
    path = tmp_path / "00000.parquet"
    x = normalize_rows(rng.standard_normal((20_000, 384)).astype(np.float32))
    pq.write_table(embedding_table([f"k{i}" for i in range(len(x))], "00000", ["c"] * len(x), x), path)
    centres = normalize_rows(rng.standard_normal((64, 384)).astype(np.float32))
    runs = []
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        runs.append(nearest_centres([path], centres, bar=False))
    assert np.array_equal(runs[0][0][0], runs[1][0][0])
    assert runs[0][1] == runs[1][1]


def test_examples_are_the_rows_nearest_each_fine_centre_best_first():
    from clustering.contact import nearest_per_fine

    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.2])
    fine = np.array([0, 0, 0, 1, 1])
    assert nearest_per_fine(scores, fine, 2) == {0: [1, 2], 1: [3, 4]}


def test_an_experts_sheet_goes_round_its_fine_clusters_before_taking_seconds():
    from clustering.contact import expert_examples

    best = {0: [0, 1, 2], 1: [3, 4], 2: [5]}
    expert_of_row = np.array([0, 0, 0, 0, 0, 1])
    assert expert_examples(best, expert_of_row, 2, 4) == [[0, 3, 1, 4], [5]]


@pytest.mark.slow
def test_the_cluster_stage_draws_a_contact_sheet_per_expert_with_its_images(tiny_run):
    from PIL import Image

    cluster = tiny_run["run_dir"] / "cluster"
    sheets = sorted((cluster / "contact").glob("*.png"))
    assert [p.name for p in sheets] == ["expert_000.png", "expert_001.png"]
    assert all(Image.open(p).size[0] > 100 for p in sheets)
    examples = (cluster / "examples.md").read_text()
    assert examples.count("examples on the sheet") == 2
    for line in (text for text in examples.splitlines() if "examples on the sheet" in text):
        shown, with_image = (int(w) for w in line.replace(",", "").split() if w.isdigit())
        assert shown > 0 and with_image == shown  # every example found in its input shard and decoded
    manifest = json.loads((cluster / "manifest.json").read_text())
    assert "contact/expert_000.png" in manifest["outputs"] and "examples.md" in manifest["outputs"]
