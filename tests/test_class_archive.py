"""The archive of Spark's classes: used only when whole, written only by a JVM that exited cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.spark import class_archive


@pytest.fixture
def archive(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(class_archive, "_writing", None)
    return class_archive.archive_path("/usr/bin/java", 'openjdk version "17.0.15"')


def test_the_archive_lives_in_the_machine_cache_and_is_named_for_java_and_spark(archive, tmp_path):
    assert archive.parent == tmp_path / "cache" / "streamfit"
    assert archive != class_archive.archive_path("/usr/bin/java", 'openjdk version "21.0.2"')


def test_a_missing_or_truncated_archive_is_not_used_and_a_whole_one_is(archive):
    assert class_archive.jvm_options(archive, write=False) == []
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"x" * 1000)
    archive.with_suffix(".json").write_text(json.dumps({"size": 2000}))  # a JVM handed this would crash
    assert not class_archive.ready(archive)
    assert class_archive.jvm_options(archive, write=False) == []
    archive.with_suffix(".json").write_text(json.dumps({"size": 1000}))
    assert class_archive.jvm_options(archive, write=True) == [f"-XX:SharedArchiveFile={archive}", class_archive.QUIET]


def test_without_an_archive_the_jvm_writes_one_under_a_temporary_name_and_stale_ones_go(archive):
    archive.parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = archive.with_name(f".{archive.name}.{dead.pid}.tmp")
    live = archive.with_name(f".{archive.name}.{os.getppid()}.tmp")  # another run writing right now
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    options = class_archive.jvm_options(archive, write=True)
    assert options == [
        f"-XX:ArchiveClassesAtExit={archive.parent}/.{archive.name}.{os.getpid()}.tmp",
        class_archive.QUIET,
    ]
    assert not stale.exists() and live.exists()
    assert not archive.exists()


WRITE_THEN_MAP = """
import sys
from pipeline.settings import load_settings
from pipeline.spark import class_archive
from pipeline.spark.session import spark_session

settings = load_settings(home=sys.argv[1], spark_master="local[1]")
spark = spark_session(settings, "class-archive-test", streaming=True, write_class_archive=sys.argv[2] == "write")
options = spark.sparkContext.getConf().get("spark.driver.extraJavaOptions")
assert spark.range(1000).selectExpr("sum(id)").first()[0] == 499500
spark.stop()
print("saved" if class_archive.save() else "not saved", "mapped" if "SharedArchiveFile" in options else "not mapped")
"""


@pytest.mark.slow
def test_up_s_session_writes_the_archive_as_its_jvm_exits_and_the_next_session_maps_it(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def session(mode: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", WRITE_THEN_MAP, str(tmp_path / "home"), mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "[warning][cds]" not in done.stdout + done.stderr  # the JVM's CDS chatter stays off the terminal
        return done.stdout.strip().splitlines()[-1]

    assert session("write") == "saved not mapped"
    archives = list((tmp_path / "cache" / "streamfit").glob("*.jsa"))
    assert len(archives) == 1 and class_archive.ready(archives[0])
    assert not list((tmp_path / "cache" / "streamfit").glob(".*.tmp"))
    assert session("write") == "not saved mapped"  # mapped, and not written again
