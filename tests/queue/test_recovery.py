"""Spools per worker process, and adoption of retired workers' spools at startup."""

import os

from mta.queue.layout import spool_dir as queue_dir
from mta.queue.recovery import adopt_orphaned_spools


def test_queue_dir_per_worker(tmp_path):
    root = str(tmp_path / "queue")
    assert queue_dir(root, 0) == root
    assert queue_dir(root, 3) == os.path.join(root, "w3")


def test_entries_of_retired_workers_are_adopted(tmp_path):
    root = tmp_path / "queue"
    for worker, name in ((1, "aaa"), (2, "bbb"), (3, "ccc")):
        d = root / f"w{worker}" / "active"
        d.mkdir(parents=True)
        (d / name).write_bytes(b"x")
        (d / (name + ".status")).write_bytes(b"{}\n")
    (root / "w3" / "dead").mkdir()
    (root / "w3" / "dead" / "ddd").write_bytes(b"y")
    (root / "w2" / "hold").mkdir()
    (root / "w2" / "hold" / "eee").write_bytes(b"held")
    moved = adopt_orphaned_spools(str(root), workers=2)
    assert moved == 6
    assert os.listdir(root / "hold") == ["eee"]
    assert sorted(os.listdir(root / "active")) == ["bbb", "bbb.status", "ccc", "ccc.status"]
    assert os.listdir(root / "dead") == ["ddd"]
    assert not (root / "w2").exists() and not (root / "w3").exists()
    assert sorted(os.listdir(root / "w1" / "active")) == ["aaa", "aaa.status"]
