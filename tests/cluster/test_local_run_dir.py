"""Where a LocalCluster keeps its logs and ready files, and what it leaves behind."""

from __future__ import annotations

import gc
import tempfile

from cluster.local import ClusterConfig, LocalCluster


def test_a_cluster_without_a_run_dir_removes_its_temporary_folder_when_collected(tmp_path, monkeypatch):
    """Every LocalCluster built without run_dir (tests, library use) once left a kvr-run-* folder
    in the temp folder for good."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cluster = LocalCluster(ClusterConfig(workers=1))
    run_dir = cluster.run_dir
    assert run_dir.parent == tmp_path and run_dir.name.startswith("kvr-run-") and (run_dir / "logs").is_dir()
    cluster.stop()  # never started: nothing to stop, and the logs folder stays while the object lives
    assert run_dir.is_dir()
    del cluster
    gc.collect()
    assert list(tmp_path.glob("kvr-run-*")) == []


def test_a_named_run_dir_is_kept(tmp_path):
    run_dir = tmp_path / "run"
    cluster = LocalCluster(ClusterConfig(workers=1, run_dir=run_dir))
    assert cluster.run_dir == run_dir
    del cluster
    gc.collect()
    assert (run_dir / "logs").is_dir()
