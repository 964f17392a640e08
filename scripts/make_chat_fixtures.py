#!/usr/bin/env python3
"""tests/fixtures/chat_templates.json: chat templates rendered by jinja2 set up as Hugging Face's
`apply_chat_template` sets it up (transformers' `_compile_jinja_template`: an ImmutableSandboxedEnvironment
with trim_blocks, lstrip_blocks, loop controls, `tojson` and `raise_exception`). saeflow renders the same
templates with minijinja (`crates/core/src/models/chat.rs`) and must produce these strings exactly.

  python3 scripts/make_chat_fixtures.py      # needs jinja2 (pip install jinja2); writes the fixture
"""
import json
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# SmolLM2-135M-Instruct's template, verbatim from its tokenizer_config.json (revision 12fd25f7).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template, verbatim from its tokenizer_config.json.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Gemma 2's (google/gemma-2-2b-it and -9b-it tokenizer_config.json): BOS written by the template, the assistant
# called `model`, contents trimmed, and a system turn refused with an exception.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# A multi-line template in the style of many others: block tags on their own indented lines (trim_blocks and
# lstrip_blocks decide the whitespace), a Python string method, a filter, a loop control and tojson.
MULTILINE = """{% for message in messages %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'].strip() }}<</SYS>>
    {% else %}
[{{ message['role'] | upper }}] {{ message['content'] }} {{ message['content'] | tojson }}
    {% endif %}
    {% if loop.index > 8 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT] {{ bos_token | tojson }}
{% endif %}
"""

CASES = [
    ("smollm2", SMOLLM2, "", "<|im_end|>"),
    ("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    ("multiline", MULTILINE, "<s>", "</s>"),
    ("gemma2", GEMMA2, "<bos>", "<eos>"),
]
CHATS = [
    ([("user", "What is the capital of France?")], True),
    ([("user", "  Spaces around, and a newline\nin the middle.  "), ("assistant", " Paris. ")], False),
    ([("system", "  Be honest. "), ("user", "Ünïcödé — «quotes» and 'apostrophes'")], True),
    ([("user", "<b>bold</b> & \\u003c a literal, \"quoted\", tab\tend")], True),
]


def main() -> None:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    out = []
    for name, source, bos, eos in CASES:
        template = env.from_string(source)
        for messages, generation in CHATS:
            msgs = [{"role": r, "content": c} for r, c in messages]
            try:
                expected = {"expected": template.render(messages=msgs, add_generation_prompt=generation,
                                                        bos_token=bos, eos_token=eos)}
            except jinja2.exceptions.TemplateError as e:
                expected = {"error": str(e)}
            out.append({
                "template_name": name,
                "template": source,
                "bos_token": bos,
                "eos_token": eos,
                "messages": messages,
                "add_generation_prompt": generation,
                **expected,
            })
    path = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chat_templates.json"
    path.write_text(json.dumps({"jinja2": jinja2.__version__, "cases": out}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(out)} renders to {path}")


if __name__ == "__main__":
    main()
