#!/usr/bin/env python3
"""Independent check of `rows.parquet` files with pyarrow: the documented schema (schemas/rows.md), unique
doc ids, pairs within one split, and row counts equal to the stage's summary.json.

  python3 scripts/check_rows_parquet.py CACHE_DIR PIPELINE_NAME   # every dataset object the pipeline's refs name
"""
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CORE = [
    ("doc_id", pa.uint64(), False),
    ("prompt", pa.string(), True),
    ("completion", pa.string(), True),
    ("text", pa.string(), False),
    ("label", pa.string(), True),
    ("label_raw", pa.string(), True),
    ("source", pa.string(), False),
    ("subset", pa.string(), True),
    ("pair_id", pa.uint64(), True),
    ("split", pa.string(), False),
]


def check(obj: Path) -> str:
    table = pq.read_table(obj / "rows.parquet")
    schema = table.schema
    for i, (name, typ, nullable) in enumerate(CORE):
        field = schema.field(i)
        assert (field.name, field.type, field.nullable) == (name, typ, nullable), f"{obj}: column {i} is {field}"
    for field in list(schema)[len(CORE):]:
        assert field.type == pa.string() and field.nullable, f"{obj}: extra column {field}"
    assert pq.ParquetFile(obj / "rows.parquet").metadata.created_by == "saeflow"
    ids = table.column("doc_id").to_pylist()
    assert len(set(ids)) == len(ids), f"{obj}: duplicate doc ids"
    assert set(table.column("split").to_pylist()) <= {"train", "val", "test"}
    split_of = {}
    for pair, split in zip(table.column("pair_id").to_pylist(), table.column("split").to_pylist()):
        if pair is not None:
            assert split_of.setdefault(pair, split) == split, f"{obj}: pair {pair} straddles splits"
    summary = json.loads((obj / "summary.json").read_text())
    assert summary["rows"] == table.num_rows, f"{obj}: summary says {summary['rows']} rows, file has {table.num_rows}"
    return f"{table.num_rows} rows, {len(schema)} columns"


def main(cache: str, pipeline: str) -> None:
    refs = sorted((Path(cache) / "refs" / pipeline).glob("*.json"))
    checked = 0
    for ref in refs:
        key = json.loads(ref.read_text())["key"]
        obj = Path(cache) / "objects" / key
        if (obj / "rows.parquet").exists():
            print(f"{ref.stem}: {check(obj)}")
            checked += 1
    assert checked, f"no rows.parquet under {cache} for pipeline {pipeline}"
    print(f"pyarrow: {checked} rows.parquet files match the documented schema")


if __name__ == "__main__":
    main(*sys.argv[1:])
