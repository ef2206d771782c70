"""Chat-format distillation data and the pipeline's --device option (tiny models, no downloads)."""

import pytest
import torch

import prunepath
from prunepath.chat_data import INSTRUCTIONS, instruction_prompts, sample_chat_ids
from prunepath.device import resolve_device
from tests.eval_tiny import tiny_llama, tiny_tokenizer, write_data_dir

TEXTS = [" = Heading = ", ""] + [f"Sentence number {i} tells a short story about item {i} ." for i in range(60)]


def test_instruction_prompts_wrap_passages_in_templates():
    ps = instruction_prompts(TEXTS, 7, seed=1, min_chars=100, max_chars=300)
    assert len(ps) == 7
    heads = [t.split("{passage}")[0] for t in INSTRUCTIONS]
    for p in ps:
        head = next(h for h in heads if p.startswith(h))
        passage = p[len(head):]
        assert 100 <= len(passage) <= 300 and "Heading" not in passage and passage in " ".join(TEXTS[2:])
    assert ps == instruction_prompts(TEXTS, 7, seed=1, min_chars=100, max_chars=300)  # seeded
    assert ps != instruction_prompts(TEXTS, 7, seed=2, min_chars=100, max_chars=300)
    many = instruction_prompts(TEXTS, 200, seed=0, min_chars=100)  # passages reused
    assert len(many) == 200


@pytest.mark.parametrize("kw,match", [({"n": 0}, "n must"), ({"n": 3, "min_chars": 10**6}, "no passage")])
def test_instruction_prompts_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        instruction_prompts(TEXTS, **kw)


def _converted(data):
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=5)
    texts = (data / "wikitext-2" / "valid.txt").read_text().splitlines()
    cfg = prunepath.PrunePathConfig(num_experts=8, router="mlp", router_rank=8, train_tokens=1024,
                                    train_seq_len=32, train_epochs=1, kmeans_iters=2)
    prunepath.convert(model, cfg, calibration=texts, tokenizer=tok, progress=False)
    return model, tok


def test_sample_chat_ids_packs_dense_conversations(tmp_path):
    model, tok = _converted(write_data_dir(tmp_path / "data", n=4))
    prunepath.set_budget(model, 0.4)
    prompts = ["Summarize: the cat sat on the mat .", "Continue: the quick brown fox"] * 3
    ids, answers = sample_chat_ids(model, tok, prompts, seq_len=16, max_new_tokens=12, batch_size=4, seed=3,
                                   progress=False)
    assert ids.dtype == torch.long and ids.shape[1] == 16 and ids.shape[0] >= 2
    assert len(answers) == len(prompts)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert int((ids == im_start).sum()) >= 2 * len(prompts) - 2  # user + assistant turns (tail may be cut)
    from prunepath.budget import routed_layers
    assert all(layer.policy == "budget" and float(layer.budget.flatten()[0]) == pytest.approx(0.4)
               for layer in routed_layers(model))  # routing restored
    again, _ = sample_chat_ids(model, tok, prompts, seq_len=16, max_new_tokens=12, batch_size=4, seed=3,
                               progress=False)
    assert torch.equal(ids, again)  # seeded sampling
    with pytest.raises(ValueError, match="seq_len"):
        sample_chat_ids(model, tok, prompts, seq_len=0, progress=False)
    with pytest.raises(ValueError, match="prompts is empty"):
        sample_chat_ids(model, tok, [], progress=False)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(None)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="cpu, cuda, cuda:N or auto"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees none"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_cli_rejects_a_missing_gpu(tmp_path):
    from prunepath import cli

    with pytest.raises(SystemExit):  # argparse: --chat-sequences takes an integer >= 0
        cli.main(["finetune", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--chat-sequences", "-1"])

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="--device"):
        cli.main(["finetune", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"])


def test_cli_finetune_with_chat_data(tmp_path):
    import json

    from prunepath import cli

    data = write_data_dir(tmp_path / "data", n=4)
    model, tok = _converted(data)
    prunepath.save(model, tmp_path / "in", tokenizer=tok)
    rc = cli.main(["finetune", "--checkpoint", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                   "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--presets", "0.5",
                   "--chat-sequences", "3", "--chat-new-tokens", "8", "--data-dir", str(data),
                   "--report", str(tmp_path / "r.json"), "--device", "cpu", "--no-progress"])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert "sampled chat conversations" in rep["data"]["source"] and len(rep["data"]["chat_answer_examples"]) == 3
    assert rep["data"]["device"] == "cpu"
