"""Tiny offline fixtures for the evaluation tests: a byte-level BPE tokenizer trained in
memory, a tiny random Llama sized to it, toy LMs with hand-computable probabilities, and a
miniature data folder laid out like ../shared/data."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog .",
    "A man is sitting on a roof . He starts pulling up roofing .",
    "Question : what is the capital of France ? Answer : Paris",
    "the cat sat on the mat and the dog sat on the log",
    "positive negative True False yes no therefore because",
    "Robert is an English film , television and theatre actor .",
] * 4


def tiny_tokenizer():
    """A byte-level BPE tokenizer (a few hundred tokens) with a chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(tokenizer, seed: int = 0, *, hidden=32, ffn=64, layers=2):
    """A tiny random Llama over ``tokenizer``'s vocabulary (fp32, eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


class BigramLM(torch.nn.Module):
    """Toy causal LM whose next-token distribution depends only on the current token:
    ``log p(next | cur) = log_softmax(table[cur])``. Hand-computable log-likelihoods."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)

    def forward(self, input_ids, attention_mask=None, use_cache=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])

    def logprob(self, cur: int, nxt: int) -> float:
        return torch.log_softmax(self.table[cur].double(), -1)[nxt].item()


def write_data_dir(root: Path, n: int = 5) -> Path:
    """A miniature evaluation data folder (``n`` items per file) in the shared/data layout."""
    root = Path(root)

    def jl(rel, rows):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def tsv(rel, header, rows):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8", newline="") as f:
            f.write("\t".join(header) + "\n")
            for r in rows:
                f.write("\t".join(str(x) for x in r) + "\n")

    words = "the cat sat on the mat and the dog sat on the log".split()
    (root / "wikitext-2").mkdir(parents=True, exist_ok=True)
    wt = "\n".join(" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(40)) + "\n"
    (root / "wikitext-2" / "test.txt").write_text(wt, encoding="utf-8")
    (root / "wikitext-2" / "valid.txt").write_text(wt, encoding="utf-8")
    jl("lambada/lambada_openai.jsonl", [{"context": "the cat sat on the", "continuation": w} for w in
                                        ["mat", "log", "dog", "cat", "roof"][:n]])
    jl("piqa/piqa.jsonl", [{"query": f"Question: how to do {i}?\n", "choices": ["use a cat", "use a dog"],
                            "gold": i % 2} for i in range(n)])
    jl("winogrande/winogrande.jsonl", [{"context_options": ["the cat sat so the cat", "the cat sat so the dog"],
                                        "continuation": "was tired .", "gold": i % 2} for i in range(n)])
    jl("boolq/boolq.jsonl", [{"query": f"Passage: the cat sat {i}.\nQuestion: did the cat sit?",
                              "choices": ["no", "yes"], "gold": 1} for i in range(n)])
    jl("arc_easy/arc_easy.jsonl", [{"query": f"Question: which animal {i}?", "choices": ["cat", "dog", "fox"],
                                    "gold": i % 3} for i in range(n)])
    jl("copa/copa.jsonl", [{"query": f"The man sat on the mat {i}, therefore",
                            "choices": ["the cat ran.", "the dog sat."], "gold": i % 2} for i in range(n)])
    tsv("rte/dev.tsv", ["sentence1", "sentence2", "label", "idx"],
        [[f"The cat sat {i}.", "A cat sat.", i % 2, i] for i in range(n)])
    tsv("sst2/dev.tsv", ["sentence", "label"], [[f"the cat is nice {i} ", i % 2] for i in range(n)])
    hs = []
    for i in range(n):
        hs += [f"Roof: A man is sitting on a roof {i}. he", str(i % 4), "starts pulling up roofing.",
               "is a cat.", "[header] sat on the mat.", "is a dog."]
    (root / "hellaswag").mkdir(parents=True, exist_ok=True)
    (root / "hellaswag" / "hellaswag_val_full.txt").write_text("\n".join(hs) + "\n", encoding="utf-8")
    jl("xsum/xsum_test_1000.jsonl", [{"document": f"The cat sat on the mat {i}. The dog sat on the log.",
                                      "summary": "The cat sat.", "id": str(100 + i)} for i in range(n)])
    (root / "story_cloze").mkdir(parents=True, exist_ok=True)
    with open(root / "story_cloze" / "storycloze_val_1571.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                    "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"])
        for i in range(n):
            w.writerow(["The cat sat.", "It was on the mat.", "The dog came.", f"They played {i}.",
                        "The cat was happy.", "The roof fell.", 1 + i % 2])
    (root / "alpaca_eval").mkdir(parents=True, exist_ok=True)
    (root / "alpaca_eval" / "alpaca_eval_text_davinci_003.json").write_text(json.dumps(
        [{"dataset": "x", "instruction": f"Name an animal {i}.", "output": "A cat.", "generator": "d"}
         for i in range(n)]), encoding="utf-8")
    jl("mt_bench/question.jsonl", [{"question_id": 81 + i, "category": "writing",
                                    "turns": [f"Write about a cat {i}.", "Again."]} for i in range(n)])
    return root
