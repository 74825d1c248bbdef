"""Small things tests build locally: no model hub, no network."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SAMPLE_TEXT = (
    "The lighthouse keeper counted the ships that passed in the night. "
    "Every morning she wrote their names in a small blue book, and every evening "
    "she read them aloud to the sea. "
) * 20


def make_tokenizer(texts=None, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in well under a second."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or [SAMPLE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|pad|>", unk_token=None,
    )


STORY_WORDS = ("the fox the crow a river under bright stars she said he asked once upon a time "
               "in the morning the baker made bread and the children laughed while snow fell softly").split()


def write_text_dataset(path, n_paragraphs: int = 120, seed: int = 0) -> None:
    """Plain prose with some structure, so a tiny model's loss falls quickly."""
    import random
    rng = random.Random(seed)
    paras = []
    for i in range(n_paragraphs):
        words = [rng.choice(STORY_WORDS) for _ in range(rng.randint(20, 60))]
        paras.append(f"Story {i}. Once upon a time " + " ".join(words) + ". In the end they were happy.")
    path.write_text("\n\n".join(paras), encoding="utf-8")


def make_local_model(folder, vocab_texts=None):
    """A tiny pretrained-style model folder: config, safetensors weights, tokenizer, licence card."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    # save_pretrained's "Writing model shards" bar would land in the stderr a test reads next (the engine
    # turns it off for itself, so the test passed only after an engine had run in this process).
    hf_logging.disable_progress_bar()
    tok = make_tokenizer(vocab_texts)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny test model\n", encoding="utf-8")
    return folder


def tiny_job(tmp_path, **overrides) -> dict:
    """A job spec dict for the scratch tiny preset on a small story file: seconds to train."""
    data = tmp_path / "stories.txt"
    if not data.exists():
        write_text_dataset(data, n_paragraphs=60)
    spec = dict(model="scratch:tiny", data=[str(data)], steps=12, batch_size=4, seq_len=32, lr=3e-3,
                warmup_steps=1, tokenizer="bytes", threads=1, sample_max_tokens=4, sample_prompts=["Once"],
                checkpoint_every=1000, eval_fraction=0.05)
    spec.update(overrides)
    return spec


def engine_job(tmp_path, name: str = "run", **overrides) -> dict:
    """The engine and worker tests' job: tiny preset, 64-token blocks of the default story file."""
    data = tmp_path / "stories.txt"
    if not data.exists():
        write_text_dataset(data)
    spec = dict(model="scratch:tiny", data=[str(data)], out=str(tmp_path / name), steps=30, batch_size=8,
                seq_len=64, lr=3e-3, warmup_steps=2, tokenizer="bytes", threads=1, sample_max_tokens=8,
                checkpoint_every=1000)
    spec.update(overrides)
    return spec
