#!/usr/bin/env python3
"""Train the small byte-level BPE tokenizer that kvmesh embeds as its default.

It exists so that a fresh clone works with no model hub: the embedded engine simulator and the
tests count real tokens with a real Hugging Face tokenizer. It is deliberately small (4,096 ids),
so it hides the cost of a production tokenizer; benchmarks use ../shared/tokenizers/ instead.

Corpus: text found on any Debian machine (license texts and Python's standard library), so the
result is reproducible without a network. Run: python3 scripts/make-tiny-tokenizer.py
"""
import glob
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = os.path.join(os.path.dirname(__file__), "..", "policy", "assets", "tiny-chat")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the template Qwen-style models ship; rendered by minijinja in kvmesh as HF does in Python.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def corpus():
    files = sorted(glob.glob("/usr/share/common-licenses/*"))
    files += sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:400]
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                yield f.read()
        except (UnicodeDecodeError, IsADirectoryError, PermissionError):
            continue


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    os.makedirs(OUT, exist_ok=True)
    tok.save(os.path.join(OUT, "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    print("vocab", tok.get_vocab_size(), "->", os.path.abspath(OUT), file=sys.stderr)


if __name__ == "__main__":
    main()
