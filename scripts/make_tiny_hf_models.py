#!/usr/bin/env python3
"""tests/fixtures/tiny_hf/: tiny randomly initialised models made and run by Hugging Face `transformers`, for
`tests/hf_models.rs`.

- `llama3/`: `rope_type = "llama3"` (Llama 3.1+), written as transformers 4 configs are (`rope_theta` +
  `rope_scaling`, the form published checkpoints use), and `llama3.gguf`, the same weights as llama.cpp's
  converter writes them (Q/K permuted for interleaved pairs, the scaling as per-frequency divisors in
  `rope_freqs.weight`, computed the way `convert_hf_to_gguf.py` does).
- `linear/`: `rope_type = "linear"`, written as transformers 5 writes it (`rope_parameters`).
- `dynamic/`: `rope_type = "dynamic"` (NTK, factor 2) with `max_position_embeddings = 64`, so the prompt
  reaches past where scaling starts; its greedy reference comes from `generate` with a KV cache (each step's
  frequencies follow the positions reached, cached keys keep theirs).
- `qwen2/`: Qwen2 (q/k/v biases, random so that they matter; tied embeddings; rope_theta 1e6).
- `qwen2_sliding/`: the same Qwen2 family with `use_sliding_window` (window 16, from layer
  `max_window_layers = 1` on); its `no_window_top5` twin must differ.
- `gemma2/`: Gemma 2 (pre- and post-norms of `1 + w`, GeGLU, √d scaled embedding, `query_pre_attn_scalar`
  ≠ head width, attention and final softcaps small enough to bite, local layers with a 16-key window that
  the 80-token prompt overruns); its `no_window_top5` / `no_softcap_top5` twins must differ. It also has a
  word-level `tokenizer.json` over its 96 ids and Gemma 2's `tokenizer_config.json` (chat template verbatim,
  BOS added) and `<end_of_turn>` in `generation_config.json`'s ends, so pipelines can run it.
- `qwen2.gguf`, `gemma2.gguf`, `gpt2.gguf`: the same families as llama.cpp's `convert_hf_to_gguf.py` writes
  them (Qwen2's and Gemma 2's Q/K unpermuted, Gemma 2's norms stored as `1 + w`, GPT-2's Conv1D weights
  transposed and its embedding copied to `output.weight`). A GGUF cannot say `query_pre_attn_scalar`, so
  `gemma2.gguf` holds a twin whose scalar is its head width (as Gemma 2 2B and 9B have), with its own
  reference `gemma2_gguf`.
- `gpt2/`: GPT-2 (learned positions, LayerNorms with biases, Conv1D weights, `gelu_new`, biases everywhere,
  random so that they matter), saved as `GPT2LMHeadModel` saves it.

`reference.json` holds, for one prompt of 80 token ids (past the 64-position original context): each model's
top-5 logits at every position, 8 greedy tokens, and the
top-5 logits of the same weights with plain rotary — which must differ, or the test could not fail.

  python3 scripts/make_tiny_hf_models.py   # needs torch, transformers, safetensors, gguf (pip); writes the fixtures
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_hf"
DIMS = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    # Weights large enough that attention depends on position: at the default 0.02 the scores are nearly
    # uniform and the rotary scaling moves the logits by < 1e-3, too little for a test to tell.
    initializer_range=0.3,
)
THETA = 10000.0
# With 16-wide heads and an original context of 64, the 8 rotary pairs fall in all three of Llama 3's
# regimes: kept (wavelength < 16), blended (16..64) and divided by the factor (> 64).
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
LINEAR = dict(rope_type="linear", factor=4.0)
PROMPT = [int(i) for i in np.random.default_rng(7).integers(1, DIMS["vocab_size"], size=80)]


def build(rope, seed, **change):
    torch.manual_seed(seed)
    config = LlamaConfig(**{**DIMS, **change}, rope_parameters={"rope_theta": THETA, **rope} if rope else {"rope_theta": THETA, "rope_type": "default"})
    model = LlamaForCausalLM(config).eval()
    # Default init leaves norms at one; random norms test that they are read.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def top5(model):
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].float()
    values, ids = logits.topk(5, dim=-1)
    return {"ids": ids.tolist(), "values": values.tolist()}


def greedy(model, n=8):
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT):]


def greedy_cached(model, n=8):
    """Greedy tokens from transformers' own generate (KV cache), for rotary kinds that depend on it."""
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def plain_twin(model):
    twin = build(None, 0)
    twin.load_state_dict(model.state_dict())
    return twin


def write_hf(model, directory, transformers4):
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if transformers4:
        # Published Llama 3 checkpoints carry transformers 4's form; write the same fields.
        cfg = json.loads((directory / "config.json").read_text())
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params
        (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_gguf(model, path):
    import gguf

    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(THETA)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    # convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors): one divisor per rotary pair.
    base_freqs = 1.0 / (THETA ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old = LLAMA3["original_max_position_embeddings"]
    low_wavelen = old / LLAMA3["low_freq_factor"]
    high_wavelen = old / LLAMA3["high_freq_factor"]
    factors = []
    for freq in base_freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(LLAMA3["factor"])
        else:
            smooth = (old / wavelen - LLAMA3["low_freq_factor"]) / (LLAMA3["high_freq_factor"] - LLAMA3["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / LLAMA3["factor"] + smooth))
    w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))

    def permute(t, heads):  # convert_hf_to_gguf.py's LlamaModel.permute
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(b + "attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(b + "attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        w.add_tensor(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_qwen2(seed, **change):
    torch.manual_seed(seed)
    dims = {**DIMS, "tie_word_embeddings": True, "use_sliding_window": False, **change}
    config = Qwen2Config(**dims, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):  # zero at init: random, so a loader that drops them fails
                p.copy_(0.5 * torch.randn_like(p))
    return model


def randomise(model):
    """Norms around one and biases away from zero (their init values), so a loader that misreads either fails."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(p + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


GEMMA2 = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24, max_position_embeddings=256,
    rms_norm_eps=1e-6, initializer_range=0.3, sliding_window=16, attn_logit_softcapping=2.0,
    final_logit_softcapping=5.0, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    attn_implementation="eager",
)


def build_gemma2(seed, **change):
    torch.manual_seed(seed)
    return randomise(Gemma2ForCausalLM(Gemma2Config(**{**GEMMA2, **change})).eval())


def twin(model, build, **change):
    other = build(0, **change)
    other.load_state_dict(model.state_dict())
    return other


# Gemma 2's chat template, verbatim from google/gemma-2-2b-it's tokenizer_config.json.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
WORDS = (
    "the of and to in is was it for on with as by at from that this be are or an not but have his her they "
    "you we he she which their one all were there been has more when will would who what so if out up about "
    "into than them can only other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still own see"
).split()


def write_word_tokenizer(directory):
    """A word-level tokenizer over the model's 96 ids: Gemma's special tokens first, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<unk>", "\n"]
    vocab = {t: i for i, t in enumerate(specials + WORDS[: 96 - len(specials)])}
    assert len(vocab) == 96
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials[:6]])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": GEMMA2_TEMPLATE,
    }, indent=2) + "\n")


def build_gpt2(seed):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.3)
    return randomise(GPT2LMHeadModel(config).eval())


def gguf_writer(path, arch, c, n_ctx):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers if arch != "gpt2" else c.n_layer)
    w.add_context_length(n_ctx)
    return w


def write_gguf_qwen2_gemma2(model, path, arch):
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf_writer(path, arch, c, c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if arch == "gemma2":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    # convert_hf_to_gguf.py's Gemma2Model stores norm weights as 1 + w.
    norm = (lambda t: t + 1) if arch == "gemma2" else (lambda t: t)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", norm(sd["model.norm.weight"]))
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if arch == "gemma2":
        names |= {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"}
    else:
        names |= {"post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, ours in names.items():
            for kind in ["weight", "bias"]:
                t = sd.get(f"model.layers.{i}.{hf}.{kind}")
                if t is not None:
                    w.add_tensor(f"blk.{i}.{ours}.{kind}", norm(t) if "norm" in ours else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf_gpt2(model, path):
    c = model.config
    w = gguf_writer(path, "gpt2", c, c.n_positions)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    sd = {k.removeprefix("transformer."): v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["wte.weight"])
    w.add_tensor("output.weight", sd["wte.weight"])  # the converter duplicates the tied embedding
    w.add_tensor("position_embd.weight", sd["wpe.weight"])
    w.add_tensor("output_norm.weight", sd["ln_f.weight"])
    w.add_tensor("output_norm.bias", sd["ln_f.bias"])
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(c.n_layer):
        for hf, ours in names.items():
            for kind in ["weight", "bias"]:
                t = sd[f"h.{i}.{hf}.{kind}"]
                if kind == "weight" and "norm" not in ours:
                    t = t.T.copy()  # Conv1D [in, out] → [out, in]
                w.add_tensor(f"blk.{i}.{ours}.{kind}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    reference = {"prompt": PROMPT, "transformers": transformers.__version__, "torch": torch.__version__}
    for name, rope, seed, transformers4 in [("llama3", LLAMA3, 1, True), ("linear", LINEAR, 2, False)]:
        model = build(rope, seed)
        write_hf(model, OUT / name, transformers4)
        reference[name] = {"top5": top5(model), "greedy": greedy(model), "plain_top5": top5(plain_twin(model))}
    write_gguf(build(LLAMA3, 1), OUT / "llama3.gguf")
    dynamic = build(dict(rope_type="dynamic", factor=2.0), 6, max_position_embeddings=64)
    write_hf(dynamic, OUT / "dynamic", False)
    reference["dynamic"] = {"top5": top5(dynamic), "greedy": greedy_cached(dynamic),
                            "plain_top5": top5(plain_twin(dynamic))}
    qwen2 = build_qwen2(3)
    qwen2.save_pretrained(OUT / "qwen2", safe_serialization=True)
    reference["qwen2"] = {"top5": top5(qwen2), "greedy": greedy(qwen2)}
    sliding = build_qwen2(7, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    sliding.save_pretrained(OUT / "qwen2_sliding", safe_serialization=True)
    reference["qwen2_sliding"] = {"top5": top5(sliding), "greedy": greedy(sliding),
                                  "no_window_top5": top5(twin(sliding, build_qwen2))}
    gemma2 = build_gemma2(4)
    gemma2.generation_config.eos_token_id = [1, 4]  # <eos>, <end_of_turn>, as Gemma 2's instruct models
    gemma2.save_pretrained(OUT / "gemma2", safe_serialization=True)
    write_word_tokenizer(OUT / "gemma2")
    reference["gemma2"] = {
        "top5": top5(gemma2),
        "greedy": greedy(gemma2),
        "no_window_top5": top5(twin(gemma2, build_gemma2, sliding_window=4096)),
        "no_softcap_top5": top5(twin(gemma2, build_gemma2, attn_logit_softcapping=None)),
    }
    gpt2 = build_gpt2(5)
    gpt2.save_pretrained(OUT / "gpt2", safe_serialization=True)
    reference["gpt2"] = {"top5": top5(gpt2), "greedy": greedy(gpt2)}
    write_gguf_qwen2_gemma2(qwen2, OUT / "qwen2.gguf", "qwen2")
    write_gguf_gpt2(gpt2, OUT / "gpt2.gguf")
    gemma2_gguf = twin(gemma2, build_gemma2, query_pre_attn_scalar=GEMMA2["head_dim"])
    reference["gemma2_gguf"] = {"top5": top5(gemma2_gguf), "greedy": greedy(gemma2_gguf)}
    write_gguf_qwen2_gemma2(gemma2_gguf, OUT / "gemma2.gguf", "gemma2")
    (OUT / "reference.json").write_text(json.dumps(reference) + "\n")


if __name__ == "__main__":
    main()
