#!/usr/bin/env python3
"""Independent check of capture artifacts with pyarrow + numpy (layout in schemas/capture.md): the
documented schemas, activation shards aligned row for row with tokens.parquet, every value finite, the
mean norms capture.json reports, and f16/bf16 captures equal to the f32 capture rounded.

  python3 scripts/check_capture.py CACHE_DIR PIPELINE_NAME   # every capture object the pipeline's refs name
"""
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOKENS = [
    ("doc_id", pa.uint64(), False),
    ("pos", pa.uint32(), False),
    ("token_id", pa.uint32(), False),
    ("label", pa.string(), True),
    ("split", pa.string(), False),
    ("is_completion", pa.bool_(), False),
    ("seq_pos", pa.uint32(), False),
    ("source", pa.string(), False),
    ("subset", pa.string(), True),
    ("pair_id", pa.uint64(), True),
]


def decode(column: pa.ChunkedArray, dtype: str, d: int) -> np.ndarray:
    """FixedSizeBinary rows of little-endian values -> float32 [rows, d]."""
    raw = b"".join(
        chunk.buffers()[1].to_pybytes()[chunk.offset * chunk.type.byte_width : (chunk.offset + len(chunk)) * chunk.type.byte_width]
        for chunk in column.chunks
    )
    if dtype == "f32":
        out = np.frombuffer(raw, dtype="<f4")
    elif dtype == "f16":
        out = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:  # bf16: the high half of a float32
        out = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return out.reshape(-1, d)


def check(obj: Path) -> dict:
    info = json.loads((obj / "capture.json").read_text())
    d, dtype = info["d_model"], info["dtype"]
    tokens = pq.read_table(obj / "tokens.parquet")
    for i, (name, typ, nullable) in enumerate(TOKENS):
        field = tokens.schema.field(i)
        assert (field.name, field.type, field.nullable) == (name, typ, nullable), f"{obj}: tokens column {i} is {field}"
    assert tokens.num_columns == len(TOKENS), f"{obj}: {tokens.num_columns} token columns"
    assert tokens.num_rows == info["tokens"], f"{obj}: {tokens.num_rows} token rows, capture.json says {info['tokens']}"
    splits = {}
    for s in tokens.column("split").to_pylist():
        splits[s] = splits.get(s, 0) + 1
    assert splits == info["splits"], f"{obj}: split counts {splits} vs {info['splits']}"
    acts = {}
    for hook in info["hooks"]:
        parts, row = [], 0
        for i, shard in enumerate(info["shards"]):
            f = pq.ParquetFile(obj / f"acts-{hook}-{i:05d}.parquet")
            assert f.metadata.created_by == "saeflow"
            table = f.read()
            field = table.schema.field("act")
            assert field.type == pa.binary(d * (4 if dtype == "f32" else 2)), f"{obj}: act column is {field.type}"
            assert field.metadata[b"saeflow.dtype"].decode() == dtype
            assert int(field.metadata[b"saeflow.d_model"]) == d
            assert shard["first_row"] == row and table.num_rows == shard["rows"], f"{obj}: shard {i} misaligned"
            parts.append(decode(table.column("act"), dtype, d))
            row += table.num_rows
        x = np.concatenate(parts)
        assert x.shape == (tokens.num_rows, d), f"{obj}: {hook} has {x.shape}, tokens {tokens.num_rows}"
        assert np.isfinite(x).all(), f"{obj}: non-finite values in {hook}"
        norm = float(np.linalg.norm(x.astype(np.float64), axis=1).mean())
        assert abs(norm - info["mean_norm"][hook]) <= 1e-4 * norm, f"{obj}: mean norm {norm} vs {info['mean_norm'][hook]}"
        acts[hook] = x
    # Rows of one document are contiguous with increasing positions (a packed document may continue).
    doc = tokens.column("doc_id").to_numpy()
    pos = tokens.column("pos").to_numpy().astype(np.int64)
    same = doc[1:] == doc[:-1]
    assert (np.diff(pos)[same] > 0).all(), f"{obj}: positions go backwards within a document"
    return {"info": info, "acts": acts, "doc": doc, "pos": pos}


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    # bf16, round to nearest even like candle / torch
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def main(cache: str, pipeline: str) -> None:
    checked = {}
    for ref in sorted((Path(cache) / "refs" / pipeline).glob("*.json")):
        obj = Path(cache) / "objects" / json.loads(ref.read_text())["key"]
        if (obj / "capture.json").exists():
            checked[ref.stem] = check(obj)
            info = checked[ref.stem]["info"]
            print(f"{ref.stem}: {info['tokens']} tokens x {len(info['hooks'])} hooks, {len(info['shards'])} shards, {info['dtype']}")
    assert checked, f"no capture under {cache} for pipeline {pipeline}"
    full = [c for c in checked.values() if c["info"]["dtype"] == "f32"]
    for name, c in checked.items():
        if c["info"]["dtype"] == "f32" or not full:
            continue
        ref = full[0]
        assert (c["doc"] == ref["doc"]).all() and (c["pos"] == ref["pos"]).all(), f"{name}: other tokens than f32"
        for hook, x in c["acts"].items():
            assert np.array_equal(x, rounded(ref["acts"][hook], c["info"]["dtype"])), f"{name}: {hook} is not the f32 capture rounded"
        print(f"{name}: equals the f32 capture rounded to {c['info']['dtype']}")
    print(f"pyarrow: {len(checked)} captures match the documented layout")


if __name__ == "__main__":
    main(*sys.argv[1:])
