"""The issue-5 training configs parse, name registered specs, and their data sections load."""

import glob
import json
import os

import pytest
from torchtitan.config import ConfigManager
from torchtitan.protocols.train_spec import get_train_spec

import titan_bayes  # noqa: F401  (registers the specs)
from titan_bayes.data import DataConfigError, build_dataloader, build_tokenizer
from titan_bayes.data.loader import build_validation_dataloader
from titan_bayes.data.testing import (
    no_network, slimpajama_records, take, wikitext_rows, write_slimpajama_copy, write_wikitext_copy,
)

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "train_configs", "wikitext103_*.toml"))
                 + glob.glob(os.path.join(ROOT, "train_configs", "slimpajama_*.toml")))


def parse(path):
    return ConfigManager().parse_args(["--job.config_file", path])


def test_all_nine_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    for spec in ("bayes_lm", "bayes_hybrid", "gdn_lm"):
        assert {f"wikitext103_{spec}_125m.toml", f"slimpajama_{spec}_340m.toml",
                f"slimpajama_{spec}_340m_continued.toml"} <= names


@pytest.fixture
def local_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    write_wikitext_copy(str(tmp_path / "wt"), "wikitext-103-raw-v1",
                        {"train": wikitext_rows(20, 0), "validation": wikitext_rows(8, 1)})
    records = {"train": slimpajama_records(40, 0), "validation": slimpajama_records(40, 1)}
    write_slimpajama_copy(str(tmp_path / "sp"), records)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for r in records["train"] + records["validation"] for w in r["text"].split()})
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2,
                                      **{w: i + 3 for i, w in enumerate(words)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tokenizer_dir / "tokenizer.json"))
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    with no_network():  # the data sections must load from local copies alone
        yield {"wikitext103": str(tmp_path / "wt"), "slimpajama": str(tmp_path / "sp"),
               "tokenizer": str(tokenizer_dir)}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_data_section_loads_from_local_copies(path, local_copies):
    job = parse(path)
    spec = get_train_spec(job.model.name)  # raises if the spec is not registered
    assert job.model.flavor in set(spec.model_args)
    assert job.checkpoint.last_save_model_only is False, "pretraining configs must be resumable"
    assert job.training.dataset == job.validation.dataset
    job.training.dataset_path = job.validation.dataset_path = local_copies[job.training.dataset]
    job.training.seq_len = job.validation.seq_len = 64
    job.training.local_batch_size = job.validation.local_batch_size = 2
    job.training.dataloader.num_workers = 0
    if job.bayes_data.tokenizer == "hf":
        job.model.hf_assets_path = local_copies["tokenizer"]
    else:
        # The gpt2 rank file is not shipped: its absence must say how to make it.
        with pytest.raises(DataConfigError, match="export-rank-file gpt2"):
            build_tokenizer(job)
        job.bayes_data.tiktoken_encoding, job.bayes_data.tiktoken_rank_file = "cl100k_base", ""
    tokenizer = build_tokenizer(job)
    (train, _), = take(build_dataloader(1, 0, tokenizer, job), 1)
    (valid, _), = take(build_validation_dataloader(1, 0, tokenizer, job), 1)
    assert train["input"].shape == valid["input"].shape == (2, 64)


@pytest.mark.parametrize("spec", ["bayes_lm", "bayes_hybrid", "gdn_lm"])
def test_continued_pretraining_loads_the_base_run_model_only(spec):
    base = parse(os.path.join(ROOT, "train_configs", f"slimpajama_{spec}_340m.toml"))
    cont = parse(os.path.join(ROOT, "train_configs", f"slimpajama_{spec}_340m_continued.toml"))
    assert cont.checkpoint.initial_load_model_only is True
    assert cont.checkpoint.initial_load_path.startswith(
        os.path.join(base.job.dump_folder, base.checkpoint.folder, "step-"))
    assert cont.job.dump_folder != base.job.dump_folder
    assert (cont.model.name, cont.model.flavor) == (base.model.name, base.model.flavor)
