"""Spark session construction for the ETL (one place, so tests and jobs agree on settings).

Under ``spark-submit`` the session already exists and its master/conf come from the submit
command; run as plain python we build a ``local[*]`` session. Settings chosen for determinism
and for small machines: fixed shuffle partitions (from the config, never the cluster default
of 200 on a 2-core box), UTC session time zone, and loopback binding when local.
"""

from __future__ import annotations

import os
import sys


def get_spark(app_name: str = "higr-etl", master: str | None = None, shuffle_partitions: int = 8,
              driver_memory: str = "2g"):
    """Return the active SparkSession or create one (``local[*]`` unless ``master`` is given)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.adaptive.enabled", "false")  # stable partitioning => deterministic shards
        .config("spark.python.worker.reuse", "true")
    )
    if master or not os.environ.get("SPARK_MASTER"):
        builder = builder.master(master or "local[*]")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
