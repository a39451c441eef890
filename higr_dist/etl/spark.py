"""Spark session construction for the ETL (one place, so tests and jobs agree on settings).

Under ``spark-submit`` the session's master and conf come from the submit command (we never
override them); run as plain python we build a ``local[*]`` session (or ``master``). Settings
chosen for determinism and for small machines: fixed shuffle partitions (from the config, never
the cluster default of 200 on a 2-core box), AQE off (stable partitioning => deterministic
shards), UTC session time zone, loopback binding and no console progress bars when local.

The JVM we launch uses the parallel (throughput) garbage collector instead of the default G1: a
batch job wants throughput, not short pauses, and G1's write barriers and concurrent threads
take CPU from the tasks; on the 10M-row ETL bench input the parallel collector was the faster
one (docs/BENCHMARKS.md, "Figures behind design choices"). Under ``spark-submit`` the JVM
already exists, so pass it there yourself:
``--conf spark.driver.extraJavaOptions=-XX:+UseParallelGC`` (and
``spark.executor.extraJavaOptions`` on a cluster).

Local Python workers must import ``higr_dist``: the checkout's root is put on ``PYTHONPATH``
before the JVM starts (a no-op when the package is installed). On a cluster the executors get
everything with the job: ``make etl-env`` (``etl/pack_env.py``) packs the dependencies (base +
``etl`` extra, no torch) into ``dist/etl-env.tar.gz`` for ``--archives ...#env`` with
``spark.pyspark.python=./env/bin/python``, and our code into ``dist/higr_dist.zip`` for
``--py-files`` (README, "The ETL on a Spark cluster"; ``tests/test_cluster.py``). Set
``spark.checkpoint.dir`` there too (:func:`materialise`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])


def _under_spark_submit() -> bool:
    """True when this Python driver was started by spark-submit (the JVM launched us)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _ensure_pythonpath() -> None:
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _ROOT not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([_ROOT, *parts])


#: JVM options of a driver we launch (see the module docstring)
DRIVER_JAVA_OPTIONS = "-XX:+UseParallelGC"


def get_spark(app_name: str = "higr-etl", master: str | None = None, shuffle_partitions: int = 8,
              driver_memory: str = "2g", java_options: str = DRIVER_JAVA_OPTIONS):
    """Return the active SparkSession or create one (``local[*]`` unless ``master`` is given).

    ``java_options``: ``spark.driver.extraJavaOptions`` of the JVM this call launches (in
    ``local`` mode the executors live in it too); ignored under ``spark-submit``.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    _ensure_pythonpath()
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        # AQE off: stable partitioning => deterministic shards
        .config("spark.sql.adaptive.enabled", "false")
        .config("spark.python.worker.reuse", "true")
    )
    if java_options and not _under_spark_submit():
        builder = builder.config("spark.driver.extraJavaOptions", java_options)
    if master:
        builder = builder.master(master)
    elif not _under_spark_submit() and not os.environ.get("SPARK_MASTER"):
        builder = builder.master("local[*]")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def materialise(df):
    """Compute ``df`` once and cut its lineage (for small, reused frames: the catalogue, item
    features, pairs).

    Uses a reliable checkpoint when the context has a checkpoint dir (set one on clusters, e.g.
    ``--conf spark.checkpoint.dir=hdfs:///tmp/ckpt``), else a local checkpoint (executor
    storage; fine for ``local[*]``, but a lost executor then fails the job: its blocks cannot be
    recomputed). Unlike ``persist``, the result is a plain scan, so a frame
    joined with itself (pairs: anchor and positive features) never recomputes its plan.
    """
    if df.sparkSession.sparkContext.getCheckpointDir():
        return df.checkpoint(eager=True)
    return df.localCheckpoint(eager=True)


@contextmanager
def session_conf(spark, key: str, value) -> Iterator[None]:
    """Set the SQL conf ``key`` to ``value`` inside the block and restore the session's value
    afterwards (also when the block raises). Plans are fixed when a frame is planned: a frame
    persisted or written inside the block keeps the setting."""
    before = spark.conf.get(key)
    spark.conf.set(key, str(value))
    try:
        yield
    finally:
        spark.conf.set(key, before)
