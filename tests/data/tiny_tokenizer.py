"""A tiny byte-level BPE checkpoint tokenizer (tokenizer.json + tokenizer_config.json), built with
`tokenizers` alone, with the chat templates of real model families in miniature."""

import json

import pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is 12 + 7? It is 19.",
    "You are a helpful assistant. Answer with one number: 3 * 4 = 12.",
    "Hello, world! Fine-tuning small models on arithmetic: 45 - 17 = 28.",
] * 4

# SmolLM2 / Qwen style (ChatML), with a default system turn.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3 style: bos_token variable, a namespace, raise_exception, whitespace control.
LLAMA3 = (
    "{{- bos_token }}{% set ns = namespace(n=0) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{%- set ns.n = ns.n + 1 %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)
# Gemma style: role renamed to "model", a `{% generation %}` block, tojson of metadata.
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim }}{% endif %}"
    "{% if message.get('meta') %}{{ message['meta'] | tojson }}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA}
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
]


def build_tokenizer(vocab_size=320):
    """A trained byte-level BPE ``tokenizers.Tokenizer`` with :data:`SPECIALS` added."""
    tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers (the `finetune` extra)")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def write_checkpoint_tokenizer(
    path, template="chatml", *, add_bos=None, generation=None, bos_in_post_processor=False
):
    """Writes tokenizer.json, tokenizer_config.json (and generation_config.json) to ``path``."""
    tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers (the `finetune` extra)")
    pytest.importorskip("jinja2", reason="chat templates need jinja2 (the `finetune` extra)")
    bos = {"chatml": "<|endoftext|>", "llama3": "<|begin_of_text|>", "gemma": "<bos>"}[template]
    eos = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}[template]
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    if bos_in_post_processor:  # as Llama / Gemma tokenizer.json files do
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": {"__type": "AddedToken", "content": eos, "special": True},
        "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATES[template],
    }
    if add_bos is not None:
        config["add_bos_token"] = add_bos
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path
