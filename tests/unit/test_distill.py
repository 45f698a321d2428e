"""Distillation: loss goes down, checkpoints are pickle-free, resuming is exact."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from headrace.client.errors import ConfigError
from headrace.models.builtin.corpus import load_corpus, sample
from headrace.models.builtin.minilm import MiniLM, MiniLMConfig
from headrace.models.compress import distill as D
from headrace.models.compress import distill_data as DD
from headrace.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer()


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return sample(load_corpus(("pydoc",)).train, 48, seed=3)


def tiny_teacher() -> MiniLM:
    """Real vocabulary (the real tokenizer feeds it), small width: fast to train."""
    torch.manual_seed(0)
    cfg = MiniLMConfig(hidden_size=32, head_dim=8, num_heads=(4, 4), intermediate_sizes=(64, 64), max_position=128,
                       source_layers=(0, 1))
    return MiniLM(cfg).eval()


def one_layer_student(teacher: MiniLM) -> MiniLM:
    """Teacher embeddings + teacher layer 0 only, like init_student does for real weights."""
    student = copy.deepcopy(teacher)
    student.layers = nn.ModuleList([student.layers[0]])
    student.config = dataclasses.replace(teacher.config, num_heads=(4,), intermediate_sizes=(64,), source_layers=(0,))
    return student


def cfg(**kw: object) -> D.DistillConfig:
    base = {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 2, "max_length": 32}
    return D.DistillConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_tiny_distillation_lowers_the_loss(tmp_path: Path, tok, sentences: list[str]) -> None:  # type: ignore[no-untyped-def]
    teacher = tiny_teacher()
    student = one_layer_student(teacher)
    targets = DD.teacher_embeddings(teacher, tok, sentences, max_length=32, progress=False)

    def mean_cos(model: MiniLM) -> float:
        got = DD.teacher_embeddings(model, tok, sentences, max_length=32, progress=False)
        return float(torch.nn.functional.cosine_similarity(got, targets).mean())

    before = mean_cos(student)
    trained, res = D.distill(student, D.DistillRun(teacher, tok, sentences, tmp_path / "run",
                             cfg(steps=60, checkpoint_every=0, batch_size=8, lr=3e-3), progress=False))
    assert res.steps == 60 and res.resumed_from == 0 and len(res.losses) >= 10
    assert res.final_loss < 0.5 * res.first_loss
    assert mean_cos(trained) > before
    assert not trained.training and trained.embeddings.word.weight.requires_grad is False  # frozen tables


@pytest.mark.timeout(120)
def test_resume_after_interruption_is_exact(tmp_path: Path, tok, sentences: list[str]) -> None:  # type: ignore[no-untyped-def]
    teacher = tiny_teacher()
    straight, full = D.distill(one_layer_student(teacher), D.DistillRun(teacher, tok, sentences, tmp_path / "a", cfg(),
                               progress=False))

    class Stop(Exception):
        pass

    def crash_at_4(step: int, folder: Path) -> None:
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        D.distill(one_layer_student(teacher), D.DistillRun(teacher, tok, sentences, tmp_path / "b", cfg(), progress=False,
                  on_checkpoint=crash_at_4))
    assert D.latest_checkpoint(tmp_path / "b") == tmp_path / "b" / "checkpoint-4"
    resumed, res = D.distill(one_layer_student(teacher), D.DistillRun(teacher, tok, sentences, tmp_path / "b", cfg(),
                             progress=False))
    assert res.resumed_from == 4 and res.steps == 6
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert res.losses == full.losses
    # keep_checkpoints=2: only the newest two remain; nothing but safetensors and JSON inside.
    ckpts = sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-4", "checkpoint-6"]
    files = {p.suffix for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert files <= {".safetensors", ".json"}
    # A finished run resumes to itself without training.
    again, res2 = D.distill(one_layer_student(teacher), D.DistillRun(teacher, tok, sentences, tmp_path / "b", cfg(), progress=False))
    assert res2.resumed_from == 6 and res2.train_s < 5


def test_resume_refuses_other_settings(tmp_path: Path, tok, sentences: list[str]) -> None:  # type: ignore[no-untyped-def]
    teacher = tiny_teacher()
    D.distill(one_layer_student(teacher), D.DistillRun(teacher, tok, sentences, tmp_path / "r", cfg(steps=2), progress=False))
    with pytest.raises(ConfigError, match="other data or settings"):
        D.distill(one_layer_student(teacher), D.DistillRun(teacher, tok, sentences, tmp_path / "r", cfg(steps=2, lr=5e-4),
                  progress=False))
    _, res = D.distill(one_layer_student(teacher), D.DistillRun(teacher, tok, sentences, tmp_path / "r", cfg(steps=2, lr=5e-4),
                       progress=False, resume=False))
    assert res.resumed_from == 0


def test_batch_plan_is_a_deterministic_bucketed_partition() -> None:
    lengths = np.random.default_rng(0).integers(5, 60, size=1000)
    c = D.DistillConfig(batch_size=16, seed=7)
    e0 = DD.epoch_batches(0, lengths, c)
    assert [b.tolist() for b in e0] == [b.tolist() for b in DD.epoch_batches(0, lengths, c)]
    assert sorted(np.concatenate(e0).tolist()) == list(range(1000))
    assert len(e0) == DD.batches_per_epoch(1000, c)
    assert [b.tolist() for b in e0] != [b.tolist() for b in DD.epoch_batches(1, lengths, c)]
    # Bucketing: a batch's lengths are close together, far more than in a random batch.
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in e0 if len(b) == 16])
    assert spread < 10


def test_schedule_and_loss() -> None:
    c = D.DistillConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert D.lr_at(0, c) == pytest.approx(1e-4) and D.lr_at(9, c) == pytest.approx(1e-3)
    assert D.lr_at(99, c) == pytest.approx(1e-3 * (1 - 0.9 * 89 / 90))
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert float(D.distill_loss(t, t, c)) == pytest.approx(0.0, abs=1e-6)
    assert float(D.distill_loss(-t, t, c)) == pytest.approx(4.0 + 2.0, abs=1e-5)  # ||2t||^2 + (1 - (-1))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="steps"):
        D.DistillConfig(steps=0)
    with pytest.raises(ConfigError, match="mse_weight"):
        D.DistillConfig(mse_weight=0, cosine_weight=0)


@pytest.mark.timeout(60)
def test_init_student_takes_teacher_layers() -> None:
    from headrace.models.builtin.minilm import load_minilm

    teacher = load_minilm()
    student = D.init_student((0, 5))
    assert student.config.num_layers == 2 and student.config.source_layers == (0, 5)
    torch.testing.assert_close(student.layers[1].ffn.out.weight, teacher.layers[5].ffn.out.weight)
    torch.testing.assert_close(student.embeddings.word.weight, teacher.embeddings.word.weight)
    assert student.num_parameters() < teacher.num_parameters()
