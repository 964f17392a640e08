#!/usr/bin/env python3
"""Writes the bad-inputs corpus (tests/bad_inputs/<format>/) and the small good bases it is fed through.

Deterministic and stdlib-only (pyarrow only for the Parquet cases). Run from anywhere:

    python3 tests/bad_inputs/make.py

Every file is listed with its consumer, exit code and message fragment in cases.toml, which
tests/bad_inputs.rs drives. Good originals it derives from: assets/quickstart/nanochat-d4 (truncated copies
of tokenizer.pkl and model_001200.pt). Nothing here executes a pickle: the unsafe ones are written with
pickle's own reducer protocol (os.system, eval and getattr are referenced, never called).
"""

import io
import json
import math
import os
import pickle
import shutil
import struct
import sys
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NANOCHAT = os.path.join(ROOT, "assets", "quickstart", "nanochat-d4")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def out(rel, data):
    path = os.path.join(HERE, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(path, "wb") as f:
        f.write(data)


def floats(n, seed, scale=0.5):
    """n deterministic pseudo-random floats in [-scale, scale)."""
    x = seed * 2654435761 % (1 << 32) or 1
    vals = []
    for _ in range(n):
        x = (1103515245 * x + 12345) % (1 << 31)
        vals.append((x / (1 << 31) * 2 - 1) * scale)
    return vals


def f32(vals):
    return struct.pack("<%df" % len(vals), *vals)


# ---------------------------------------------------------------------------------------------- JSONL / CSV

def text_formats():
    good = [
        {"text": "The sky is blue.", "label": "true"},
        {"text": "The sky is green.", "label": "false"},
        {"text": "Water is wet.", "label": "true"},
        {"text": "Fire is cold.", "label": "false"},
    ]
    lines = [json.dumps(r) for r in good]
    out("base/rows.jsonl", "\n".join(lines) + "\n")

    j = "jsonl/"
    out(j + "empty.jsonl", b"")
    out(j + "blank-lines-only.jsonl", "\n\n   \n")
    out(j + "truncated.jsonl", "\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    out(j + "not-an-object.jsonl", lines[0] + "\n" + '["The sky", "true"]\n')
    out(j + "string-line.jsonl", lines[0] + '\n"just a string"\n')
    out(j + "missing-field.jsonl", lines[0] + '\n{"txt": "typo in the field name", "label": "true"}\n')
    out(j + "nan-value.jsonl", lines[0] + '\n{"text": "x", "label": "true", "score": NaN}\n')
    out(j + "infinity-value.jsonl", lines[0] + '\n{"text": "x", "label": "true", "score": Infinity}\n')
    out(j + "huge-number.jsonl", lines[0] + '\n{"text": "x", "label": "true", "score": 1e999}\n')
    out(j + "deep-nesting.jsonl", lines[0] + "\n" + '{"text": ' + "[" * 20000 + "]" * 20000 + "}\n")
    out(j + "invalid-utf8.jsonl", lines[0].encode() + b'\n{"text": "caf\xe9", "label": "true"}\n')
    out(j + "label-not-in-map.jsonl", lines[0] + '\n{"text": "x", "label": "maybe"}\n')
    out(j + "trailing-comma.jsonl", '{"text": "a", "label": "true",}\n')

    c = "csv/"
    out(c + "empty.csv", b"")
    out(c + "header-only.csv", "text,label\n")
    out(c + "ragged-row.csv", 'text,label\n"The sky is blue.",true\n"The sky is green.",false,extra\n')
    out(c + "truncated-row.csv", 'text,label\n"The sky is blue.",true\n"The sky is gr')
    out(c + "missing-column.csv", "sentence,label\nThe sky is blue.,true\n")
    out(c + "invalid-utf8.csv", b"text,label\ncaf\xe9,true\n")
    out(c + "label-not-in-map.csv", "text,label\nThe sky is blue.,NaN\n")
    out(c + "binary-garbage.csv", bytes(range(256)) * 4)


# -------------------------------------------------------------------------------------------------- Parquet

def parquet():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        print("pyarrow is missing: Parquet cases left as they are", file=sys.stderr)
        return

    def table_bytes(table, **kw):
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="none", use_dictionary=False, **kw)
        return buf.getvalue()

    good = table_bytes(pa.table({"text": ["a", "b", "c"], "label": ["true", "false", "true"]}))
    p = "parquet/"
    out(p + "empty.parquet", b"")
    out(p + "truncated.parquet", good[: len(good) // 2])
    out(p + "not-parquet.parquet", b"PAR1" + b"this is not a parquet file at all" + b"PAR1")
    out(p + "footer-only.parquet", b"PAR1")
    # The footer claims 2 GiB of metadata in a file of a few hundred bytes.
    out(p + "huge-metadata-length.parquet", good[:-8] + struct.pack("<i", 0x7FFFFFFF) + b"PAR1")
    # A hand-written FileMetaData whose schema list declares 2^31-1 elements (thrift compact protocol).
    meta = bytes([0x15, 0x02, 0x19, 0xFC]) + bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x07])
    out(p + "huge-schema-list.parquet", b"PAR1" + meta + struct.pack("<i", len(meta)) + b"PAR1")
    # Structs nested 5000 deep in the footer (a recursive decoder would exhaust its stack).
    meta = b"\x1c" * 5000 + b"\x00" * 5000
    out(p + "deep-footer.parquet", b"PAR1" + meta + struct.pack("<i", len(meta)) + b"PAR1")
    out(p + "text-is-a-list.parquet",
        table_bytes(pa.table({"text": [["a", "b"], ["c"]], "label": ["true", "false"]})))
    out(p + "text-is-binary.parquet",
        table_bytes(pa.table({"text": pa.array([b"a", b"b"], pa.binary()), "label": ["true", "false"]})))
    # A NaN label is read as null (pandas' missing value), so it is no bad input; infinity is.
    out(p + "inf-value.parquet",
        table_bytes(pa.table({"text": ["a", "b"], "label": ["true", "false"],
                              "score": pa.array([0.5, float("inf")], pa.float32())})))
    out(p + "missing-column.parquet", table_bytes(pa.table({"sentence": ["a"], "label": ["true"]})))
    out(p + "no-rows.parquet",
        table_bytes(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())})))


# -------------------------------------------------------------------------------------- safetensors / SAE

D_IN, D_SAE = 6, 12
HOOK = "blocks.0.hook_resid_post"


def safetensors(tensors, metadata=None, header_override=None):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header, data, pos = {}, b"", 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        data += raw
        pos += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = header_override if header_override is not None else json.dumps(header, sort_keys=True).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def sae_cfg(**changes):
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0", "hook_name": HOOK, "model_name": "synthetic"},
    }
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def sae_tensors(d_in=D_IN, d_sae=D_SAE):
    return [
        ["W_enc", "F32", (d_in, d_sae), f32(floats(d_in * d_sae, 1))],
        ["b_enc", "F32", (d_sae,), f32(floats(d_sae, 2, 0.1))],
        ["W_dec", "F32", (d_sae, d_in), f32(floats(d_sae * d_in, 3))],
        ["b_dec", "F32", (d_in,), f32(floats(d_in, 4, 0.1))],
    ]


def sae():
    good = safetensors(sae_tensors())
    out("base/sae/cfg.json", sae_cfg())
    out("base/sae/sae_weights.safetensors", good)

    s = "safetensors/"
    out(s + "empty.safetensors", b"")
    out(s + "truncated.safetensors", good[: len(good) - 40])
    out(s + "header-cut.safetensors", good[:20])
    out(s + "huge-header-length.safetensors", struct.pack("<Q", 1 << 60) + good[8:])
    out(s + "header-not-json.safetensors", safetensors([], header_override=b"{not json at all"))
    # W_enc claims 1M x 1M floats (4 TB) in a file of a few hundred bytes.
    t = sae_tensors()
    huge = safetensors(t, header_override=json.dumps({
        "W_enc": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]},
    }).encode())
    out(s + "huge-tensor.safetensors", huge)
    # Offsets consistent with the shape, shape not with the bytes present.
    out(s + "shape-offsets-mismatch.safetensors", safetensors(t, header_override=json.dumps({
        "W_enc": {"dtype": "F32", "shape": [D_IN, D_SAE * 1000], "data_offsets": [0, D_IN * D_SAE * 4]},
    }).encode()))
    t = sae_tensors()
    t[0] = ["W_enc", "F32", (D_SAE, D_IN), t[0][3]]
    out(s + "transposed-w-enc.safetensors", safetensors(t))
    out(s + "missing-b-dec.safetensors", safetensors(sae_tensors()[:3]))
    t = sae_tensors()
    t[0] = ["W_enc", "I32", (D_IN, D_SAE), struct.pack("<%di" % (D_IN * D_SAE), *range(D_IN * D_SAE))]
    out(s + "int-weights.safetensors", safetensors(t))
    t = sae_tensors()
    t[2] = ["W_dec", "BOOL", (D_SAE, D_IN), bytes(D_SAE * D_IN)]
    out(s + "bool-weights.safetensors", safetensors(t))
    t = sae_tensors()
    vals = floats(D_IN * D_SAE, 1)
    vals[7] = float("nan")
    t[0][3] = f32(vals)
    out(s + "nan-w-enc.safetensors", safetensors(t))
    t = sae_tensors()
    vals = floats(D_IN, 4, 0.1)
    vals[0] = float("inf")
    t[3][3] = f32(vals)
    out(s + "inf-b-dec.safetensors", safetensors(t))
    t = sae_tensors()
    t[1] = ["b_enc", "F16", (D_SAE,), struct.pack("<%de" % D_SAE, *([0.0] * 11 + [float("-inf")]))]
    out(s + "f16-inf-b-enc.safetensors", safetensors(t))
    out(s + "unknown-dtype.safetensors", safetensors(sae_tensors(), header_override=json.dumps({
        "W_enc": {"dtype": "F128", "shape": [D_IN, D_SAE], "data_offsets": [0, D_IN * D_SAE * 4]},
    }).encode()))
    out(s + "overlapping-offsets.safetensors", safetensors(sae_tensors(), header_override=json.dumps({
        "W_enc": {"dtype": "F32", "shape": [D_IN, D_SAE], "data_offsets": [0, D_IN * D_SAE * 4]},
        "b_enc": {"dtype": "F32", "shape": [D_SAE], "data_offsets": [0, D_SAE * 4]},
    }).encode()))

    c = "sae_cfg/"
    out(c + "empty.json", b"")
    text = sae_cfg()
    out(c + "truncated.json", text[: len(text) // 2])
    out(c + "not-an-object.json", "[6, 12]\n")
    out(c + "d-in-string.json", sae_cfg(d_in="6"))
    out(c + "d-sae-missing.json", sae_cfg(d_sae=None))
    out(c + "d-in-negative.json", sae_cfg(d_in=-6))
    out(c + "d-in-float.json", sae_cfg(d_in=6.5))
    out(c + "d-sae-huge.json", sae_cfg(d_sae=1 << 40))
    out(c + "d-in-wrong.json", sae_cfg(d_in=7))
    out(c + "nan.json", sae_cfg().replace('"d_in": 6', '"d_in": NaN'))
    out(c + "architecture-unknown.json", sae_cfg(architecture="gated"))
    out(c + "architecture-not-string.json", sae_cfg(architecture=5))
    out(c + "topk-without-k.json", sae_cfg(architecture="topk"))
    out(c + "topk-k-too-large.json", sae_cfg(architecture="topk", k=100))
    out(c + "topk-k-zero.json", sae_cfg(architecture="topk", k=0))
    out(c + "topk-k-string.json", sae_cfg(architecture="topk", k="8"))
    out(c + "jumprelu-no-threshold.json", sae_cfg(architecture="jumprelu"))
    out(c + "normalize-unknown.json", sae_cfg(normalize_activations="expected_average_only_in"))
    out(c + "apply-b-dec-not-bool.json", sae_cfg(apply_b_dec_to_input="yes"))
    out(c + "rescale-not-bool.json", sae_cfg(architecture="topk", k=4, rescale_acts_by_decoder_norm="yes"))


# --------------------------------------------------------------------------------------- pickles / torch .pt

class Fake:
    """Stands for a callable under a chosen module.name, so pickle writes that global."""


def fake_global(module, name):
    mod = sys.modules.get(module)
    if mod is None:
        mod = types.ModuleType(module)
        sys.modules[module] = mod
        parent, _, child = module.rpartition(".")
        if parent:
            setattr(fake_global_module(parent), child, mod)
    obj = getattr(mod, name, None)
    if obj is None:
        obj = type(name, (Fake,), {"__module__": module, "__qualname__": name})
        setattr(mod, name, obj)
    return obj


def fake_global_module(module):
    mod = sys.modules.get(module)
    if mod is None:
        mod = types.ModuleType(module)
        sys.modules[module] = mod
    return mod


class Reduce:
    def __init__(self, fn, args, dictitems=None):
        self.fn, self.args, self.dictitems = fn, args, dictitems

    def __reduce__(self):
        if self.dictitems is None:
            return (self.fn, self.args)
        return (self.fn, self.args, None, None, iter(self.dictitems))


class Storage:
    def __init__(self, cls, key, numel):
        self.cls, self.key, self.numel = cls, key, numel


def torch_pickle(obj, protocol=2):
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=protocol)
    p.persistent_id = lambda o: (
        ("storage", o.cls, o.key, "cpu", o.numel) if isinstance(o, Storage) else None
    )
    p.dump(obj)
    return buf.getvalue()


def tensor(key, shape, storage="FloatStorage", numel=None, offset=0, stride=None):
    if stride is None:
        stride, acc = [], 1
        for d in reversed(shape):
            stride.insert(0, acc)
            acc *= d
    if numel is None:
        numel = math.prod(shape)
    rebuild = fake_global("torch._utils", "_rebuild_tensor_v2")
    st = Storage(fake_global("torch", storage), key, numel)
    return Reduce(rebuild, (st, offset, tuple(shape), tuple(stride), False, Reduce(
        fake_global("collections", "OrderedDict"), ())))


def ordered(items):
    """An OrderedDict as torch pickles one: OrderedDict() then SETITEMS."""
    return Reduce(fake_global("collections", "OrderedDict"), (), list(items))


def pt_zip(pkl, storages=(), byteorder=b"little", name="archive", extra=()):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        def add(n, data):
            z.writestr(zipfile.ZipInfo(f"{name}/{n}", FIXED_TIME), data)
        if pkl is not None:
            add("data.pkl", pkl)
        if byteorder is not None:
            add("byteorder", byteorder)
        for key, data in storages:
            add(f"data/{key}", data)
        add("version", b"3\n")
        for n, data in extra:
            add(n, data)
    return buf.getvalue()


# The tiny vintage nanochat the shape/value cases describe: vocab 16, width 8, 2 heads, 1 layer.
TINY = {"sequence_len": 16, "vocab_size": 16, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "n_embd": 8}


def tiny_nanochat(mutate=None):
    """(pickle, storages) of a complete tiny nanochat state dict; mutate(name, shape, vals) may change it."""
    v, d = TINY["vocab_size"], TINY["n_embd"]
    params = [("transformer.wte.weight", (v, d))]
    for s, shape in [("attn.c_q.weight", (d, d)), ("attn.c_k.weight", (d, d)), ("attn.c_v.weight", (d, d)),
                     ("attn.c_proj.weight", (d, d)), ("mlp.c_fc.weight", (4 * d, d)),
                     ("mlp.c_proj.weight", (d, 4 * d))]:
        params.append((f"transformer.h.0.{s}", shape))
    params.append(("lm_head.weight", (v, d)))
    items, storages = [], []
    for i, (name, shape) in enumerate(params):
        vals = floats(math.prod(shape), 10 + i)
        if mutate:
            r = mutate(name, shape, vals)
            if r is None:
                continue
            shape, vals = r
        items.append((name, tensor(str(i), shape)))
        storages.append((str(i), f32(vals)))
    return torch_pickle(ordered(items)), storages


def tiny_meta():
    return json.dumps({"step": 1, "model_config": TINY}, indent=2) + "\n"


def unsafe_pickles(prefix, ext, wrap):
    """os.system, builtins.eval, __builtin__.getattr and a protocol-4 os.system (STACK_GLOBAL)."""
    out(prefix + "posix-system" + ext, wrap(pickle.dumps(Reduce(os.system, ("echo pwned",)), protocol=2)))
    out(prefix + "builtins-eval" + ext, wrap(pickle.dumps(Reduce(eval, ("1+1",)), protocol=4)))
    out(prefix + "builtin-getattr" + ext, wrap(pickle.dumps(Reduce(getattr, (0, "real")), protocol=2)))
    out(prefix + "stack-global-system" + ext,
        wrap(pickle.dumps({"x": Reduce(os.system, ("echo pwned",))}, protocol=4)))


def torch_pt():
    p = "pt/"
    pkl, storages = tiny_nanochat()
    good_tiny = pt_zip(pkl, storages)
    out(p + "empty.pt", b"")
    out(p + "truncated.pt", good_tiny[: len(good_tiny) - 60])
    out(p + "not-a-zip.pt", pkl)
    out(p + "no-data-pkl.pt", pt_zip(None, storages))
    unsafe_pickles(p, ".pt", lambda b: pt_zip(b))
    out(p + "root-not-a-dict.pt", pt_zip(torch_pickle([1, 2, 3])))
    out(p + "entry-not-a-tensor.pt", pt_zip(torch_pickle(ordered([("transformer.wte.weight", [1.0, 2.0])]))))
    # A 1M x 1M float tensor (4 TB) over a 16-byte storage.
    out(p + "huge-tensor.pt", pt_zip(torch_pickle(ordered([
        ("transformer.wte.weight", tensor("0", (1 << 20, 1 << 20), numel=4))])), [("0", bytes(16))]))
    # Sizes whose product overflows 64 bits.
    out(p + "overflowing-shape.pt", pt_zip(torch_pickle(ordered([
        ("transformer.wte.weight", tensor("0", (1 << 40, 1 << 40), numel=4, stride=(1, 1)))])),
        [("0", bytes(16))]))
    out(p + "negative-size.pt", pt_zip(torch_pickle(ordered([
        ("transformer.wte.weight", tensor("0", (-1, 4), numel=4, stride=(4, 1)))])), [("0", bytes(16))]))
    out(p + "storage-missing.pt", pt_zip(torch_pickle(ordered([
        ("transformer.wte.weight", tensor("7", (2, 2)))])), [("0", bytes(16))]))
    out(p + "unsupported-storage.pt", pt_zip(torch_pickle(ordered([
        ("transformer.wte.weight", tensor("0", (2, 2), storage="CharStorage"))])), [("0", bytes(4))]))
    out(p + "non-contiguous.pt", pt_zip(torch_pickle(ordered([
        ("transformer.wte.weight", tensor("0", (2, 2), stride=(1, 2)))])), [("0", bytes(16))]))
    out(p + "big-endian.pt", pt_zip(pkl, storages, byteorder=b"big"))
    # A zip64 storage entry whose declared uncompressed size is 1 TB (the bytes present: 16).
    z = pt_zip(torch_pickle(ordered([("transformer.wte.weight", tensor("0", (2, 2)))])), [("0", bytes(16))])
    out(p + "zip-declares-1tb.pt", zip_declare_size(z, "archive/data/0", 1 << 40))

    # Complete tiny models (with a tiny meta json beside them) with one thing wrong.
    def swap(target, fn):
        return lambda name, shape, vals: fn(shape, vals) if name == target else (shape, vals)

    def nan_at(i, value):
        def f(shape, vals):
            vals = list(vals)
            vals[i] = value
            return shape, vals
        return f

    out(p + "tiny.meta.json", tiny_meta())
    out(p + "tiny-good.pt", good_tiny)
    for case, mutate in [
        ("wrong-shape-c-q", swap("transformer.h.0.attn.c_q.weight", lambda s, v: ((8, 9), v + v[:8]))),
        ("wrong-rank-wte", swap("transformer.wte.weight", lambda s, v: ((128,), v))),
        ("nan-wte", swap("transformer.wte.weight", nan_at(5, float("nan")))),
        ("inf-lm-head", swap("lm_head.weight", nan_at(3, float("-inf")))),
        ("missing-lm-head", lambda name, shape, vals: None if name == "lm_head.weight" else (shape, vals)),
    ]:
        pkl_, st = tiny_nanochat(mutate)
        out(p + case + ".pt", pt_zip(pkl_, st))


def zip_declare_size(data, name, size):
    """Rewrites a stored zip entry's uncompressed size in its local and central headers as a zip64 value."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            raw = src.read(info)
            zi = zipfile.ZipInfo(info.filename, FIXED_TIME)
            if info.filename == name:
                with dst.open(zi, "w", force_zip64=True) as f:
                    f.write(raw)
            else:
                dst.writestr(zi, raw)
    b = bytearray(buf.getvalue())
    target = name.encode()
    # Patch the zip64 extra field (id 1: uncompressed size, then compressed size) after the entry's name in
    # both the local header (PK\3\4) and the central directory (PK\1\2).
    patched = 0
    for sig, name_at, extra_len_at, hdr in [(b"PK\x03\x04", 26, 28, 30), (b"PK\x01\x02", 28, 30, 46)]:
        i = b.find(sig)
        while i >= 0:
            n, e = struct.unpack_from("<HH", b, i + name_at)
            if bytes(b[i + hdr:i + hdr + n]) == target:
                j = i + hdr + n
                while j < i + hdr + n + e:
                    tag, ln = struct.unpack_from("<HH", b, j)
                    if tag == 1:
                        struct.pack_into("<Q", b, j + 4, size)
                        patched += 1
                    j += 4 + ln
                # Local header uncompressed-size field must read 0xFFFFFFFF for zip64.
                size_at = 22 if sig == b"PK\x03\x04" else 24
                struct.pack_into("<I", b, i + size_at, 0xFFFFFFFF)
            i = b.find(sig, i + 4)
    assert patched >= 1, "no zip64 field patched"
    return bytes(b)


def tokenizer_pkl():
    t = "tokenizer_pkl/"
    original = open(os.path.join(NANOCHAT, "tokenizer", "tokenizer.pkl"), "rb").read()
    out(t + "empty.pkl", b"")
    out(t + "truncated.pkl", original[: len(original) // 3])
    unsafe_pickles(t, ".pkl", lambda b: b)
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    byte_ranks = {bytes([i]): i for i in range(256)}

    def enc(**fields):
        base = {"name": "tiny", "pat_str": pat, "mergeable_ranks": dict(byte_ranks),
                "special_tokens": {"<|bos|>": 256}}
        for k, v in fields.items():
            if v is None:
                base.pop(k)
            else:
                base[k] = v
        return pickle.dumps(base, protocol=4)

    out(t + "not-an-encoding.pkl", pickle.dumps([1, 2, 3], protocol=4))
    out(t + "no-pat-str.pkl", enc(pat_str=None))
    out(t + "pat-str-not-string.pkl", enc(pat_str=42))
    out(t + "bad-regex.pkl", enc(pat_str="(unclosed"))
    out(t + "ranks-not-a-dict.pkl", enc(mergeable_ranks=[1, 2]))
    out(t + "rank-not-int.pkl", enc(mergeable_ranks={b"a": "zero"}))
    out(t + "rank-nan.pkl", enc(mergeable_ranks={**byte_ranks, b"ab": float("nan")}))
    out(t + "rank-negative.pkl", enc(mergeable_ranks={**byte_ranks, b"ab": -1}))
    out(t + "rank-huge.pkl", enc(mergeable_ranks={**byte_ranks, b"ab": 1 << 40}))
    out(t + "duplicate-rank.pkl", enc(mergeable_ranks={**byte_ranks, b"ab": 7}))
    out(t + "special-collides.pkl", enc(special_tokens={"<|bos|>": 65}))
    out(t + "missing-single-bytes.pkl", enc(mergeable_ranks={b"ab": 0, b"cd": 1}, special_tokens={}))
    out(t + "sparse-ranks.pkl", enc(mergeable_ranks={**byte_ranks, b"ab": 1 << 31}))
    # Declared lengths far beyond the file: BINBYTES8, BINUNICODE8, FRAME, LONG4.
    proto4 = b"\x80\x04"
    out(t + "huge-binbytes8.pkl", proto4 + b"\x8e" + struct.pack("<Q", 1 << 60) + b"abc")
    out(t + "huge-binunicode8.pkl", proto4 + b"\x8d" + struct.pack("<Q", 1 << 60) + b"abc")
    out(t + "huge-frame.pkl", proto4 + b"\x95" + struct.pack("<Q", 1 << 62) + b"}.")
    out(t + "huge-long4.pkl", b"\x80\x02" + b"\x8b" + struct.pack("<i", 0x7FFFFFFF) + b"\x00" * 8)
    out(t + "negative-binbytes.pkl", b"\x80\x03" + b"B" + struct.pack("<i", -5) + b"abc.")
    # 100k nested lists: ]]]...aaa (no recursion may follow the nesting).
    depth = 100000
    out(t + "deep-nesting.pkl", b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    out(t + "memo-get-missing.pkl", b"\x80\x02" + b"h\x07.")
    out(t + "stack-underflow.pkl", b"\x80\x02" + b"s.")
    out(t + "no-stop.pkl", b"\x80\x02}")
    out(t + "unknown-opcode.pkl", b"\x80\x02\xff.")
    out(t + "protocol-99.pkl", b"\x80\x63}.")


# ----------------------------------------------------------------------------------------------------- meta

def meta_json():
    m = "meta_json/"
    original = json.load(open(os.path.join(NANOCHAT, "base_checkpoints", "d4", "meta_001200.json")))

    def with_cfg(**changes):
        meta = json.loads(json.dumps(original))
        for k, v in changes.items():
            if v is None:
                meta["model_config"].pop(k)
            else:
                meta["model_config"][k] = v
        return json.dumps(meta, indent=2) + "\n"

    text = json.dumps(original, indent=2) + "\n"
    out(m + "empty.json", b"")
    out(m + "truncated.json", text[: len(text) // 2])
    out(m + "no-model-config.json", json.dumps({"step": 1200}) + "\n")
    out(m + "model-config-not-object.json", json.dumps({"model_config": [4, 128]}) + "\n")
    out(m + "n-embd-string.json", with_cfg(n_embd="128"))
    out(m + "n-embd-float.json", with_cfg(n_embd=128.5))
    out(m + "n-layer-negative.json", with_cfg(n_layer=-1))
    out(m + "n-head-missing.json", with_cfg(n_head=None))
    out(m + "heads-zero.json", with_cfg(n_head=0))
    out(m + "heads-not-dividing.json", with_cfg(n_head=3, n_kv_head=3))
    out(m + "nan.json", with_cfg().replace('"sequence_len": 128', '"sequence_len": NaN'))
    out(m + "huge-sequence-len.json", with_cfg(sequence_len=1 << 62))
    out(m + "huge-n-embd.json", with_cfg(n_embd=1 << 40))
    out(m + "huge-vocab.json", with_cfg(vocab_size=1 << 50))
    out(m + "more-layers-than-weights.json", with_cfg(n_layer=6))
    out(m + "fewer-layers-than-weights.json", with_cfg(n_layer=2))
    out(m + "vocab-smaller-than-weights.json", with_cfg(vocab_size=1000))
    out(m + "width-not-matching-weights.json", with_cfg(n_embd=64))


# ------------------------------------------------------------------------------------------ GGUF / tokenizer

GG_STR, GG_U32, GG_F32, GG_BOOL, GG_ARR, GG_U64, GG_I32 = 8, 4, 6, 7, 9, 10, 5
TL = {"vocab": 16, "d": 8, "heads": 2, "ff": 16}


def gg_string(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gg_value(kind, v):
    if kind == GG_STR:
        return gg_string(v)
    if kind == GG_U32:
        return struct.pack("<I", v)
    if kind == GG_I32:
        return struct.pack("<i", v)
    if kind == GG_U64:
        return struct.pack("<Q", v)
    if kind == GG_F32:
        return struct.pack("<f", v)
    if kind == GG_BOOL:
        return struct.pack("<B", v)
    raise ValueError(kind)


def llama_meta(**changes):
    meta = [
        ("general.architecture", GG_STR, "llama"),
        ("llama.block_count", GG_U32, 1),
        ("llama.embedding_length", GG_U32, TL["d"]),
        ("llama.attention.head_count", GG_U32, TL["heads"]),
        ("llama.attention.head_count_kv", GG_U32, TL["heads"]),
        ("llama.feed_forward_length", GG_U32, TL["ff"]),
        ("llama.context_length", GG_U32, 64),
        ("llama.attention.layer_norm_rms_epsilon", GG_F32, 1e-5),
        ("llama.rope.freq_base", GG_F32, 10000.0),
    ]
    for key, val in changes.items():
        key = key.replace("__", ".")
        meta = [m for m in meta if m[0] != key]
        if val is not None:
            meta.append((key,) + val)
    return meta


def llama_tensors(mutate=None):
    """(name, dims in GGUF order (fastest first), ggml type, bytes) of the tiny llama, f32."""
    v, d, ff = TL["vocab"], TL["d"], TL["ff"]
    shapes = [("token_embd.weight", (v, d)), ("output_norm.weight", (d,)),
              ("blk.0.attn_norm.weight", (d,)), ("blk.0.attn_q.weight", (d, d)),
              ("blk.0.attn_k.weight", (d, d)), ("blk.0.attn_v.weight", (d, d)),
              ("blk.0.attn_output.weight", (d, d)), ("blk.0.ffn_norm.weight", (d,)),
              ("blk.0.ffn_gate.weight", (ff, d)), ("blk.0.ffn_up.weight", (ff, d)),
              ("blk.0.ffn_down.weight", (d, ff))]
    out_ = []
    for i, (name, shape) in enumerate(shapes):
        vals = [1.0] * shape[0] if len(shape) == 1 else floats(math.prod(shape), 30 + i)
        if mutate:
            r = mutate(name, shape, vals)
            if r is None:
                continue
            shape, vals = r
        out_.append((name, tuple(reversed(shape)), 0, f32(vals)))
    return out_


def gguf(meta=None, tensors=None, version=3, magic=b"GGUF", tensor_count=None, kv_count=None,
         offsets=None, alignment=32):
    meta = llama_meta() if meta is None else meta
    tensors = llama_tensors() if tensors is None else tensors
    h = magic + struct.pack("<I", version)
    h += struct.pack("<QQ", len(tensors) if tensor_count is None else tensor_count,
                     len(meta) if kv_count is None else kv_count)
    for key, kind, val in meta:
        h += gg_string(key) + struct.pack("<I", kind)
        if kind == GG_ARR:
            sub, items = val
            h += struct.pack("<IQ", sub, len(items)) + b"".join(gg_value(sub, x) for x in items)
        else:
            h += gg_value(kind, val)
    data, pos = b"", 0
    for i, (name, dims, ty, raw) in enumerate(tensors):
        off = pos if offsets is None else offsets[i]
        h += gg_string(name) + struct.pack("<I", len(dims)) + struct.pack("<%dQ" % len(dims), *dims)
        h += struct.pack("<IQ", ty, off)
        data += raw + b"\0" * (-len(raw) % alignment)
        pos = len(data)
    h += b"\0" * (-len(h) % alignment)
    return h + data


def tokenizer_json(vocab_size=TL["vocab"], **changes):
    words = ["[UNK]", "the", "sky", "is", "blue", "green", "water", "wet", "fire", "cold", ".", "a", "b",
             "c", "true", "false"]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words[:vocab_size])},
                  "unk_token": "[UNK]"},
    }
    tok.update(changes)
    return json.dumps(tok, indent=1) + "\n"


def gguf_cases():
    good = gguf()
    out("base/tiny-llama/model.gguf", good)
    out("base/tiny-llama/tokenizer.json", tokenizer_json())
    g = "gguf/"
    out(g + "empty.gguf", b"")
    out(g + "bad-magic.gguf", b"GGML" + good[4:])
    out(g + "version-99.gguf", gguf(version=99))
    out(g + "header-cut.gguf", good[:40])
    out(g + "data-cut.gguf", good[: len(good) - 300])
    out(g + "huge-tensor-count.gguf", gguf(tensor_count=1 << 40))
    out(g + "huge-kv-count.gguf", gguf(kv_count=1 << 62))
    meta = llama_meta()
    meta.insert(0, ("general.name", GG_STR, "x"))
    raw = gguf(meta=meta)
    at = raw.index(gg_string("general.name")) + len(gg_string("general.name")) + 4
    out(g + "huge-string-length.gguf", raw[:at] + struct.pack("<Q", 1 << 60) + raw[at + 8:])
    meta = llama_meta(tokenizer__ggml__tokens=(GG_ARR, (GG_STR, ["a", "b"])))
    raw = gguf(meta=meta)
    at = raw.index(gg_string("tokenizer.ggml.tokens")) + len(gg_string("tokenizer.ggml.tokens")) + 4 + 4
    out(g + "huge-array-length.gguf", raw[:at] + struct.pack("<Q", 1 << 61) + raw[at + 8:])
    # token_embd claims 1M x 1M f32 (4 TB).
    out(g + "huge-tensor.gguf", gguf(tensors=llama_tensors(
        lambda n, s, v: ((1 << 20, 1 << 20), v) if n == "token_embd.weight" else (s, v))))
    # Dimensions whose product overflows 64 bits.
    out(g + "overflowing-dims.gguf", gguf(tensors=[
        (n, (1 << 40, 1 << 40, 1 << 40) if n == "token_embd.weight" else dims, ty, raw)
        for n, dims, ty, raw in llama_tensors()]))
    out(g + "huge-offset.gguf", gguf(offsets=[0] + [1 << 63] * 10))
    out(g + "too-many-dims.gguf", gguf(tensors=[
        (n, (1, 1, 1, 1, 2, 2) if n == "output_norm.weight" else dims, ty, raw)
        for n, dims, ty, raw in llama_tensors()]))
    out(g + "unknown-ggml-type.gguf", gguf(tensors=[
        (n, dims, 99 if n == "output_norm.weight" else ty, raw) for n, dims, ty, raw in llama_tensors()]))
    out(g + "alignment-zero.gguf", gguf(meta=llama_meta(general__alignment=(GG_U32, 0))))
    out(g + "architecture-falcon.gguf", gguf(meta=llama_meta(general__architecture=(GG_STR, "falcon"))))
    out(g + "block-count-missing.gguf", gguf(meta=llama_meta(llama__block_count=None)))
    out(g + "block-count-string.gguf", gguf(meta=llama_meta(llama__block_count=(GG_STR, "1"))))
    out(g + "block-count-huge.gguf", gguf(meta=llama_meta(llama__block_count=(GG_U32, 0xFFFFFFFF))))
    out(g + "heads-zero.gguf", gguf(meta=llama_meta(llama__attention__head_count=(GG_U32, 0))))
    out(g + "context-huge.gguf", gguf(meta=llama_meta(llama__context_length=(GG_U32, 0xFFFFFFFF))))
    out(g + "rope-theta-nan.gguf", gguf(meta=llama_meta(llama__rope__freq_base=(GG_F32, float("nan")))))
    out(g + "rms-eps-inf.gguf",
        gguf(meta=llama_meta(llama__attention__layer_norm_rms_epsilon=(GG_F32, float("inf")))))
    out(g + "missing-tensor.gguf", gguf(tensors=llama_tensors(
        lambda n, s, v: None if n == "blk.0.ffn_down.weight" else (s, v))))
    out(g + "wrong-shape-q.gguf", gguf(tensors=llama_tensors(
        lambda n, s, v: ((TL["d"], TL["d"] + 1), v + v[: TL["d"]]) if n == "blk.0.attn_q.weight" else (s, v))))
    out(g + "width-mismatch.gguf", gguf(meta=llama_meta(llama__embedding_length=(GG_U32, 16))))

    def poison(target, i, value):
        def f(n, s, v):
            if n == target:
                v = list(v)
                v[i] = value
            return s, v
        return f

    out(g + "nan-weights.gguf", gguf(tensors=llama_tensors(poison("token_embd.weight", 3, float("nan")))))
    out(g + "inf-norm.gguf", gguf(tensors=llama_tensors(poison("output_norm.weight", 0, float("inf")))))

    t = "tokenizer_json/"
    text = tokenizer_json()
    out(t + "empty.json", b"")
    out(t + "truncated.json", text[: len(text) // 2])
    out(t + "not-json.json", "model: WordLevel\n")
    out(t + "model-missing.json", json.dumps({"version": "1.0"}) + "\n")
    out(t + "model-unknown-type.json", tokenizer_json(model={"type": "Quantum", "vocab": {}}))
    out(t + "vocab-is-a-list.json", tokenizer_json(model={"type": "WordLevel", "vocab": ["a", "b"],
                                                          "unk_token": "[UNK]"}))
    out(t + "vocab-id-negative.json", tokenizer_json(model={"type": "WordLevel", "vocab": {"[UNK]": 0, "a": -1},
                                                            "unk_token": "[UNK]"}))
    out(t + "vocab-id-huge.json", tokenizer_json(model={"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1 << 40},
                                                        "unk_token": "[UNK]"}))
    out(t + "nan-score.json", tokenizer_json().replace('"[UNK]": 0', '"[UNK]": NaN'))
    out(t + "unk-not-in-vocab.json", tokenizer_json(model={"type": "WordLevel", "vocab": {"a": 0},
                                                           "unk_token": "[MISSING]"}))
    out(t + "bpe-merge-unknown-token.json", tokenizer_json(model={
        "type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a c"], "dropout": None, "unk_token": None,
        "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False}))
    out(t + "pre-tokenizer-unknown.json", tokenizer_json(pre_tokenizer={"type": "Telepathy"}))
    out(t + "deep-nesting.json", '{"model": ' + "[" * 20000 + "]" * 20000 + "}\n")
    out(t + "more-ids-than-model.json", tokenizer_json(vocab_size=40))
    out(t + "added-token-id-huge.json", tokenizer_json(added_tokens=[{
        "id": 100000, "content": "<|big|>", "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": True}]))


# ------------------------------------------------------------------------- Hugging Face directory (config.json)

def hf_config(**changes):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": TL["vocab"],
           "hidden_size": TL["d"], "intermediate_size": TL["ff"], "num_hidden_layers": 1,
           "num_attention_heads": TL["heads"], "num_key_value_heads": TL["heads"], "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": True}
    for key, val in changes.items():
        if val is None:
            cfg.pop(key, None)
        else:
            cfg[key] = val
    return json.dumps(cfg, indent=1)


def hf_cases():
    """base/tiny-hf: the tiny llama as a Hugging Face directory (config.json, model.safetensors with a tied
    head, tokenizer.json); hf/*.json: config.json fields zero, negative, huge, of the wrong type, missing."""
    v, d, ff = TL["vocab"], TL["d"], TL["ff"]
    shapes = [("model.embed_tokens.weight", (v, d)), ("model.norm.weight", (d,)),
              ("model.layers.0.input_layernorm.weight", (d,)),
              ("model.layers.0.self_attn.q_proj.weight", (d, d)),
              ("model.layers.0.self_attn.k_proj.weight", (d, d)),
              ("model.layers.0.self_attn.v_proj.weight", (d, d)),
              ("model.layers.0.self_attn.o_proj.weight", (d, d)),
              ("model.layers.0.post_attention_layernorm.weight", (d,)),
              ("model.layers.0.mlp.gate_proj.weight", (ff, d)),
              ("model.layers.0.mlp.up_proj.weight", (ff, d)),
              ("model.layers.0.mlp.down_proj.weight", (d, ff))]
    tensors = []
    for i, (name, shape) in enumerate(shapes):
        vals = [1.0] * shape[0] if len(shape) == 1 else floats(math.prod(shape), 60 + i)
        tensors.append((name, "F32", shape, f32(vals)))
    out("base/tiny-hf/config.json", hf_config())
    out("base/tiny-hf/model.safetensors", safetensors(tensors))
    out("base/tiny-hf/tokenizer.json", tokenizer_json())
    h = "hf/"
    out(h + "zero-heads.json", hf_config(num_attention_heads=0))
    out(h + "zero-kv-heads.json", hf_config(num_key_value_heads=0))
    out(h + "zero-layers.json", hf_config(num_hidden_layers=0))
    out(h + "zero-hidden.json", hf_config(hidden_size=0))
    out(h + "zero-head-dim.json", hf_config(head_dim=0))
    out(h + "heads-not-dividing-width.json", hf_config(num_attention_heads=3, num_key_value_heads=3))
    out(h + "kv-heads-not-dividing-heads.json", hf_config(num_key_value_heads=3))
    out(h + "negative-layers.json", hf_config(num_hidden_layers=-1))
    out(h + "negative-vocab.json", hf_config(vocab_size=-16))
    out(h + "huge-hidden.json", hf_config(hidden_size=1 << 40))
    out(h + "huge-layers.json", hf_config(num_hidden_layers=10 ** 9))
    out(h + "huge-vocab.json", hf_config(vocab_size=1 << 40))
    out(h + "huge-context.json", hf_config(max_position_embeddings=1 << 40))
    out(h + "zero-eps.json", hf_config(rms_norm_eps=0.0))
    out(h + "heads-as-string.json", hf_config(num_attention_heads="2"))
    out(h + "width-as-float.json", hf_config(hidden_size=8.5))
    out(h + "missing-hidden.json", hf_config(hidden_size=None))
    out(h + "width-not-matching-weights.json", hf_config(hidden_size=16))
    out(h + "rope-scaling.json", hf_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    out(h + "not-json.json", "{\"hidden_size\": 8,")
    out(h + "array.json", "[1, 2, 3]")



def main():
    for d in ["jsonl", "csv", "parquet", "safetensors", "sae_cfg", "pt", "tokenizer_pkl", "meta_json", "gguf",
              "tokenizer_json", "base", "hf"]:
        shutil.rmtree(os.path.join(HERE, d), ignore_errors=True)
    text_formats()
    parquet()
    sae()
    torch_pt()
    tokenizer_pkl()
    meta_json()
    gguf_cases()
    hf_cases()
    total = 0
    for dirpath, _, files in os.walk(HERE):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    print(f"corpus: {total} bytes")


if __name__ == "__main__":
    main()
