#!/usr/bin/env python3
"""Regenerates the fuzzers' seed corpora under fuzz/seeds/<target>/ (committed; a few hundred KB in all).

Seeds are valid inputs except those named evil-*, refused-*, unsupported-* or invalid-* (error paths); the unit tests
in src/models/ check both (`every_seed_*`).

Run from anywhere: `python3 fuzz/make_seeds.py`. Uses only the standard library; with torch installed
(e.g. /tmp/torch-venv/bin/python) it also adds a checkpoint written by torch.save itself. Every other file
is built by hand so the seeds stay small and the script runs on a bare machine. Outputs are deterministic.
"""

import io
import json
import pickle
import shutil
import struct
import sys
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"


def out(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# ---- pipeline_toml: the shipped pipelines and the bad-config fixtures --------------------------------------
def pipelines():
    for p in sorted((ROOT / "pipelines").glob("*.toml")):
        out("pipeline_toml", p.name, p.read_bytes())
    for p in sorted((ROOT / "tests" / "bad_inputs" / "pipeline").glob("*.toml")):
        out("pipeline_toml", "bad-" + p.name, p.read_bytes())


# ---- pickles: a fake tiktoken Encoding pickled by the real pickle module ----------------------------------
def fake_tiktoken_module():
    tiktoken = types.ModuleType("tiktoken")
    core = types.ModuleType("tiktoken.core")

    class Encoding:
        def __init__(self, name, pat_str, mergeable_ranks, special_tokens):
            self.state = dict(
                name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
            )

        def __getstate__(self):
            return self.state

    Encoding.__module__ = "tiktoken.core"
    Encoding.__qualname__ = "Encoding"
    core.Encoding = Encoding
    tiktoken.core = core
    sys.modules["tiktoken"] = tiktoken
    sys.modules["tiktoken.core"] = core
    return Encoding


PAT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def tokenizers():
    Encoding = fake_tiktoken_module()
    ranks = {bytes([i]): i for i in range(256)}
    for j, m in enumerate([b"th", b"he", b"the", b"in", b" t", b"er"]):
        ranks[m] = 256 + j
    specials = {"<|bos|>": 262, "<|user_start|>": 263, "<|user_end|>": 264}
    small = Encoding("fuzz", PAT, ranks, specials)
    out("tokenizer_pkl", "small-proto4.pkl", pickle.dumps(small, protocol=4))
    # Protocol 2 pickles bytes as _codecs.encode(...): refused (not allow-listed), an error-path seed.
    out("tokenizer_pkl", "refused-proto2.pkl", pickle.dumps(small, protocol=2))
    tiny_ranks = {bytes([i]): i for i in range(256)}
    tiny_ranks[b"ab"] = 256
    tiny = Encoding("tiny", r"\S+|\s+", tiny_ranks, {"<|bos|>": 257})
    out("tokenizer_pkl", "tiny.pkl", pickle.dumps(tiny, protocol=4))
    # Ranks without every single byte: tiktoken would panic encoding text they do not cover.
    partial = Encoding("partial", r"\S+|\s+", {b"a": 0, b"b": 1, b"ab": 2}, {"<|bos|>": 3})
    out("tokenizer_pkl", "invalid-missing-bytes.pkl", pickle.dumps(partial, protocol=4))
    real = ROOT / "assets" / "quickstart" / "nanochat-d4" / "tokenizer" / "tokenizer.pkl"
    if real.exists() and real.stat().st_size < 100_000:
        shutil.copy(real, SEEDS / "tokenizer_pkl" / "nanochat-d4.pkl")
    # The pickle target gets the tokenizer pickles too, plus plain data and a refused global.
    for p in sorted((SEEDS / "tokenizer_pkl").glob("*.pkl")):
        if p.stat().st_size < 20_000:
            out("pickle", "tok-" + p.name, p.read_bytes())
    data = {"a": [1, b"\x00", "x", 2**40, -3], "b": (2.5, None, True), "c": {"d": [[], ()]}}
    for proto in range(0, 6):
        # Protocols 0 and 1 use text opcodes the reader does not support, and protocol 2 pickles bytes as
        # _codecs.encode(...), which is not allow-listed: error-path seeds.
        name = {0: "unsupported-proto0.pkl", 1: "unsupported-proto1.pkl", 2: "refused-proto2.pkl"}.get(
            proto, f"data-proto{proto}.pkl"
        )
        out("pickle", name, pickle.dumps(data, protocol=proto))
    shared = [1, 2]
    out("pickle", "shared-memo.pkl", pickle.dumps([shared, shared, (shared,)], protocol=4))
    out("pickle", "evil-os-system.pkl", b"\x80\x02cposix\nsystem\nq\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.")


# ---- torch checkpoints: data.pkl + data/<key>, as torch.save lays them out --------------------------------
class Persistent:
    """Stands for a torch storage in a hand-written data.pkl (pickled as a persistent id)."""

    def __init__(self, storage, key, numel):
        self.pid = ("storage", storage, key, "cpu", numel)


class Rebuild:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""

    def __init__(self, storage, offset, shape, stride):
        self.args = (storage, offset, tuple(shape), tuple(stride), False, {})


class GlobalRef:
    """Pickles as a GLOBAL opcode naming `module.name`."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *a):  # never called; only pickled by name
        raise RuntimeError


def dump_torch_pickle(obj):
    """Pure-Python pickler (for the hooks) at protocol 2 with GLOBAL opcodes, as torch.save writes."""

    buf = io.BytesIO()

    class P(pickle._Pickler):
        def persistent_id(self, o):
            return o.pid if isinstance(o, Persistent) else None

        def save_global(self, o, name=None):
            if isinstance(o, GlobalRef):
                self.write(pickle.GLOBAL + f"{o.module}\n{o.name}\n".encode())
                return
            return super().save_global(o, name)

        def reducer_override(self, o):
            if isinstance(o, Rebuild):
                return (GlobalRef("torch._utils", "_rebuild_tensor_v2"), o.args)
            return NotImplemented

    P.dispatch = dict(pickle._Pickler.dispatch)
    P.dispatch[GlobalRef] = lambda self, o: self.save_global(o)
    P(buf, protocol=2).dump(obj)
    return buf.getvalue()


def torch_zip(entries, pkl):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in entries.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def torch_checkpoints():
    from collections import OrderedDict

    w = struct.pack("<6f", 0, 1, 2, 3, 4, 5)
    b = struct.pack("<3e", 0.5, -1, 2)
    sd = OrderedDict()
    sd["w"] = Rebuild(Persistent(GlobalRef("torch", "FloatStorage"), "0", 6), 0, [2, 3], [3, 1])
    sd["b"] = Rebuild(Persistent(GlobalRef("torch", "HalfStorage"), "1", 3), 0, [3], [1])
    sd["row"] = Rebuild(Persistent(GlobalRef("torch", "FloatStorage"), "0", 6), 3, [3], [1])
    pkl = dump_torch_pickle(sd)
    out("torch_pt", "state-dict.pt", torch_zip({"0": w, "1": b}, pkl))
    out("pickle", "torch-state-dict.pkl", pkl)
    # OpenAI SAE style: tensors next to plain entries.
    extras = {"k": 32, "activation": "TopK", "enc": Rebuild(Persistent(GlobalRef("torch", "FloatStorage"), "0", 6), 0, [6], [1])}
    pkl2 = dump_torch_pickle(extras)
    out("torch_pt", "with-extras.pt", torch_zip({"0": w}, pkl2))
    out("pickle", "torch-with-extras.pkl", pkl2)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)
    real = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
            "i": torch.tensor([1, 2], dtype=torch.int64)}
    buf = io.BytesIO()
    torch.save(real, buf)
    out("torch_pt", "torch-save.pt", buf.getvalue())
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        out("pickle", "torch-save-data.pkl", z.read([n for n in z.namelist() if n.endswith("data.pkl")][0]))


# ---- GGUF: header, metadata (with a gpt2 tokenizer), a few small tensors ----------------------------------
def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(v):
    """(type id, payload) of a Python value."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, gguf_string(v)
    if isinstance(v, list):
        ty = gguf_value(v[0])[0] if v else 4
        return 9, struct.pack("<IQ", ty, len(v)) + b"".join(gguf_value(x)[1] for x in v)
    raise TypeError(v)


def gguf_file(metadata, tensors, alignment=32):
    """tensors: (name, dims (ggml order: fastest first), ggml type, raw bytes)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, v in metadata.items():
        ty, payload = gguf_value(v)
        head += gguf_string(k) + struct.pack("<I", ty) + payload
    offset, blobs = 0, b""
    for name, dims, ty, raw in tensors:
        head += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<IQ", ty, offset)
        pad = (-len(raw)) % alignment
        blobs += raw + b"\0" * pad
        offset += len(raw) + pad
    head += b"\0" * ((-len(head)) % alignment)
    return head + blobs


def q8_0_block(values):
    """One Q8_0 block: f16 scale + 32 int8."""
    amax = max(abs(x) for x in values) or 1.0
    d = amax / 127
    return struct.pack("<e", d) + bytes((round(x / d) & 0xFF) for x in values)


def ggufs():
    tokens = ["a", "b", "c", "ab", "abc", "Ġ", "<|bos|>"]
    meta = {
        "general.architecture": "llama",
        "general.alignment": 32,
        "llama.block_count": 1,
        "llama.embedding_length": 4,
        "llama.attention.head_count": 2,
        "llama.feed_forward_length": 8,
        "llama.context_length": 64,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["a b", "ab c"],
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 1, 3],
        "tokenizer.ggml.bos_token_id": 6,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ messages }}",
    }
    f32 = ("token_embd.weight", [4, 7], 0, struct.pack("<28f", *[i / 10 for i in range(28)]))
    f16 = ("output_norm.weight", [4], 1, struct.pack("<4e", 1, 1, 1, 1))
    q8 = ("blk.0.ffn_up.weight", [32, 1], 8, q8_0_block([i - 16 for i in range(32)]))
    bf16 = ("blk.0.attn_norm.weight", [4], 30, b"\x80\x3f" * 4)
    out("gguf_header", "llama-tiny.gguf", gguf_file(meta, [f32, f16, q8, bf16]))
    out("gguf_header", "metadata-only.gguf", gguf_file({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
                                                        "tokenizer.ggml.tokens": ["x", "y"], "tokenizer.ggml.merges": []}, []))
    nested = {"general.name": "nested", "x.arrays": [[1, 2], [3]]}
    out("gguf_header", "nested-array.gguf", gguf_file(nested, [f16]))


# ---- safetensors: 8-byte header length, JSON header, data ------------------------------------------------
def safetensors_file(tensors, metadata=None):
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensorss():
    sae = [
        ("W_enc", "F32", [4, 8], struct.pack("<32f", *[i / 32 for i in range(32)])),
        ("W_dec", "F32", [8, 4], struct.pack("<32f", *[-i / 32 for i in range(32)])),
        ("b_enc", "F32", [8], struct.pack("<8f", *[0] * 8)),
        ("b_dec", "F32", [4], struct.pack("<4f", *[0] * 4)),
        ("threshold", "F32", [8], struct.pack("<8f", *[0.1] * 8)),
    ]
    out("safetensors_header", "sae-weights.safetensors", safetensors_file(sae, {"format": "pt"}))
    mixed = [
        ("model.embed_tokens.weight", "BF16", [2, 2], b"\x80\x3f" * 4),
        ("model.norm.weight", "F16", [2], struct.pack("<2e", 1, 1)),
        ("ids", "I64", [2], struct.pack("<2q", 1, -1)),
        ("mask", "U8", [3], b"\x01\x00\x01"),
        ("empty", "F32", [0, 3], b""),
        ("scalar", "F64", [], struct.pack("<d", 3.5)),
    ]
    out("safetensors_header", "hf-mixed.safetensors", safetensors_file(mixed))
    out("safetensors_header", "empty.safetensors", safetensors_file([]))


def main():
    if SEEDS.exists():
        shutil.rmtree(SEEDS)
    pipelines()
    tokenizers()
    torch_checkpoints()
    ggufs()
    safetensorss()
    total = sum(p.stat().st_size for p in SEEDS.rglob("*") if p.is_file())
    for d in sorted(SEEDS.iterdir()):
        print(f"{d.name}: {len(list(d.iterdir()))} files")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
