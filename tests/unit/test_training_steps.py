"""Training for real, in this process, without Ray: forward, backward and AdamW steps of 2-layer
models through the project's DeepSpeed engine (ZeRO-0 unless named; fp32 on the CPU) on one rank
of a gloo group, the way a Tune trial runs (training.ensure_process_group).

Pre-training goes through pretrain.py's own pieces (`_setup_engine`, `_Targets`, `_batches`,
`_train_step`, `_evaluate`, `_save_checkpoint`/`_load_checkpoint`); fine-tuning through
`finetune.fit_classifier` itself. What is checked: the loss goes down on a fixed batch (masked- and
causal-LM), gradient accumulation takes one optimizer step per window and equals one big batch, a
checkpoint restores a run exactly, and fit_classifier learns a learnable task and resumes after the
epoch of its checkpoint. The integration tier runs the same loops under Ray Train; these catch a
broken step in seconds.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.train
import torch
from transformers import PreTrainedTokenizerFast

from components import accelerator, finetune, models, pretrain, synthetic, training
from components import tokenize as tok
from components.ranking import Ranking
from components.schemas import (
    DeepSpeedConfig,
    Hyperparameters,
    ModelConfig,
    PretrainConfig,
    TokenizeConfig,
    span_count,
)
from components.tasks import task_type
from components.vocab import special_ids

SEQ_LEN = 32
SEED = 0
THREADS = 1  # a tiny model gains nothing from a second thread, and the unit tier shares 2 cores


@pytest.fixture(scope="module", autouse=True)
def one_rank() -> Iterator[None]:
    """One process rank, as in a Tune trial; the thread count and the environment variables the
    group and DeepSpeed set (MASTER_PORT, RANK, ...) are put back for the rest of the session."""
    environment, threads = dict(os.environ), torch.get_num_threads()
    accelerator.prepare_process(use_gpu=False, num_threads=THREADS)
    # Kept for the process's life, as in a Tune trial: DeepSpeed caches groups made from it
    # (deepspeed.utils.groups), and a module after this one in the same worker would get dead ones.
    training.ensure_process_group()
    yield
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Corpus:
    tokenizer: PreTrainedTokenizerFast
    tokenizer_dir: Path
    blocks: torch.Tensor  # [rows, SEQ_LEN] token ids, as the pretrain loop reads them


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The tokenize stage's outputs for the synthetic corpus, made with its own batch functions
    (Ray Data only maps them over batches): a WordPiece tokenizer and packed blocks."""
    return _tokenized(tmp_path_factory.mktemp("tokenized"), sentinels=0)


@pytest.fixture(scope="module")
def sentinel_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The same, tokenized for span corruption (the sentinels the t5 family gets at SEQ_LEN)."""
    return _tokenized(tmp_path_factory.mktemp("tokenized-t5"), sentinels=span_count(SEQ_LEN, 0.15, 3.0))


def _tokenized(folder: Path, sentinels: int) -> Corpus:
    texts = [row["text"] for row in synthetic.generate("corpus", 300, seed=SEED)]
    tokenizer = tok.train_tokenizer(texts, TokenizeConfig(vocab_size=200, seq_len=SEQ_LEN, sentinels=sentinels))
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "pretrain_blocks").mkdir()
    pq.write_table(
        tok.pack_blocks(pa.table({"text": texts}), tokenizer_dir=str(folder / "tokenizer"), seq_len=SEQ_LEN),
        folder / "pretrain_blocks" / "part-0.parquet",
    )
    blocks = training.load_columns(folder / "pretrain_blocks", ["input_ids"])["input_ids"]
    assert blocks.shape[1] == SEQ_LEN and len(blocks) >= 64
    return Corpus(tokenizer, folder / "tokenizer", blocks)


def _stage(
    *,
    family: str = "bert",
    dropout: float = 0.0,
    micro_batch: int = 8,
    accumulation: int = 1,
    zero_stage: int = 0,
    max_steps: int = 40,
    warmup_steps: int = 4,
    learning_rate: float = 5e-3,
) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(family=family, dropout=dropout),
        max_steps=max_steps,
        batch_size_per_worker=micro_batch,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        deepspeed=DeepSpeedConfig(zero_stage=zero_stage, gradient_accumulation_steps=accumulation),
    )


def _weights(engine) -> list[torch.Tensor]:
    return [param.detach().clone() for param in engine.module.parameters()]


def _max_difference(one: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(one, other, strict=True))


def _fixed_mask_loss(engine, tokenizer: PreTrainedTokenizerFast, objective: str, batch: torch.Tensor) -> float:
    """The loop's held-out loss on `batch`, with the same masks every time it is asked."""
    masker = pretrain._Targets(tokenizer, objective, 0.15, seed=SEED + 99)
    metrics = pretrain._evaluate(engine, masker, batch, training.Shard(0, 1, len(batch)), objective)
    return metrics[f"eval/{objective}_loss"]


def _train(
    engine, masker: pretrain._Targets, data: torch.Tensor, stage: PretrainConfig, *, start: int, stop: int
) -> list[float]:
    """Optimizer steps start+1 .. stop as pretrain's loop makes them: `_batches` picks the rows from
    the step, and each step is `gradient_accumulation_steps` calls of `_train_step`. Returns each
    step's mean micro-batch loss."""
    accumulation = stage.deepspeed.gradient_accumulation_steps
    shard = training.Shard(0, 1, stage.batch_size_per_worker)
    batches = pretrain._batches(data, shard, stage.max_steps * accumulation, SEED, start=start * accumulation)
    return [
        sum(pretrain._train_step(engine, masker, data[next(batches)].long()) for _ in range(accumulation))
        / accumulation
        for _ in range(start, stop)
    ]


# --------------------------------------------------------------------------- pre-training


@pytest.mark.parametrize(
    "family, steps, max_ratio", [("bert", 60, 0.75), ("gpt2", 40, 0.3), ("t5", 60, 0.65), ("bart", 60, 0.65)]
)
def test_pretraining_steps_overfit_a_fixed_batch(
    corpus: Corpus, sentinel_corpus: Corpus, family: str, steps: int, max_ratio: float
) -> None:
    """All start near ln(vocabulary) = ln(200) = 5.3. Masked-LM draws new masks every step, so it
    memorises the batch more slowly than causal-LM: measured ratios after/before of about 0.6 over
    seeds 0-2 (0.1 for causal-LM), hence the looser bound. Span corruption draws new spans every
    step too: 0.34-0.38 after/before over seeds 0-2, 0.49-0.54 for the last five steps' losses."""
    corpus = sentinel_corpus if family in ("t5", "bart") else corpus
    stage = _stage(family=family, max_steps=steps)
    engine = pretrain._setup_engine(stage, corpus.tokenizer, SEED)
    objective = stage.model.objective
    expected = {"bert": "mlm", "gpt2": "clm", "t5": "span", "bart": "span"}[family]
    assert (engine.module.config.model_type, objective) == (family, expected)
    batch = corpus.blocks[: stage.batch_size_per_worker].long()
    before = _fixed_mask_loss(engine, corpus.tokenizer, objective, batch)
    masker = pretrain._Targets(corpus.tokenizer, objective, stage.mlm_probability, seed=SEED)
    losses = [pretrain._train_step(engine, masker, batch) for _ in range(stage.max_steps)]
    after = _fixed_mask_loss(engine, corpus.tokenizer, objective, batch)
    assert before > 0.9 * math.log(len(corpus.tokenizer))
    assert after < max_ratio * before, (before, after)
    assert sum(losses[-5:]) / 5 < max_ratio * sum(losses[:5]) / 5, losses
    assert engine.global_steps == stage.max_steps


def test_pretraining_evaluation_over_ranks_counts_each_block_once(corpus: Corpus) -> None:
    """Rank 1 of 2 over 3 held-out blocks evaluates block 1 and forwards block 0 again without
    counting it. Marking that repeat's labels wrote -100 into a causal LM's inputs too (its labels
    are its inputs): an IndexError in the embedding, on any odd count of blocks."""
    stage = _stage(family="gpt2")
    engine = pretrain._setup_engine(stage, corpus.tokenizer, SEED)
    masker = pretrain._Targets(corpus.tokenizer, "clm", stage.mlm_probability, seed=SEED)
    blocks = corpus.blocks[:3].long()
    second = pretrain._evaluate(engine, masker, blocks, training.Shard(1, 2, 2), "clm")
    assert second == pretrain._evaluate(engine, masker, blocks[1:2], training.Shard(0, 1, 2), "clm")


def test_gradient_accumulation_takes_one_step_per_window_equal_to_one_big_batch(corpus: Corpus) -> None:
    """4 micro-batches of 2 rows accumulated vs 1 batch of 8, same weights and rows. Causal-LM with
    no dropout: every row has SEQ_LEN - 1 targets, so the mean of the micro-batch losses is the big
    batch's loss (masked-LM's target count varies per micro-batch, so its mean of means would not be)."""
    windows, accumulation, micro = 2, 4, 2
    # warmup over every step: the learning rate changes at each optimizer step, and only there
    kwargs = {"family": "gpt2", "max_steps": 4, "warmup_steps": 3, "learning_rate": 1e-3}
    accumulating = pretrain._setup_engine(
        _stage(micro_batch=micro, accumulation=accumulation, **kwargs), corpus.tokenizer, SEED
    )
    whole = pretrain._setup_engine(_stage(micro_batch=micro * accumulation, **kwargs), corpus.tokenizer, SEED)
    masker = pretrain._Targets(corpus.tokenizer, "clm", 0.15, seed=SEED)
    assert _max_difference(_weights(accumulating), _weights(whole)) == 0.0
    for window in range(windows):
        rows = corpus.blocks[window * micro * accumulation : (window + 1) * micro * accumulation].long()
        learning_rate, before = accumulating.get_lr()[0], _weights(accumulating)
        losses = []
        for index in range(accumulation):
            losses.append(pretrain._train_step(accumulating, masker, rows[index * micro : (index + 1) * micro]))
            boundary = index == accumulation - 1
            assert accumulating.global_steps == window + boundary
            assert (accumulating.get_lr()[0] != learning_rate) == boundary
            assert (_max_difference(_weights(accumulating), before) > 0) == boundary
        whole_loss = pretrain._train_step(whole, masker, rows)
        assert sum(losses) / accumulation == pytest.approx(whole_loss, abs=1e-5)
        # DeepSpeed divides each micro-batch's loss by the accumulation steps: the summed gradient
        # is the big batch's (optimizer_step records its norm before the step).
        assert training.grad_norm(accumulating) == pytest.approx(training.grad_norm(whole), rel=1e-5)
        # Not bit-equal: four summed gradients round differently from one, and AdamW's m/sqrt(v)
        # magnifies that for near-zero gradients (seen from 4e-7 to 1.1e-5 over runs), far below a
        # step (about the LR, 1e-3); an accumulation that took the wrong steps differs by a step.
        moved = _max_difference(_weights(accumulating), before)
        assert _max_difference(_weights(accumulating), _weights(whole)) < moved / 20
    assert whole.global_steps == accumulating.global_steps == windows


@pytest.mark.parametrize("zero_stage", [0, 2], ids=["zero0", "zero2"])
def test_a_pretraining_checkpoint_restores_the_run_exactly(corpus: Corpus, tmp_path: Path, zero_stage: int) -> None:
    """Weights, AdamW state, LR schedule, the data position and every RNG (dropout draws on torch's,
    masking on the masker's) come back: the restored run's next steps are the uninterrupted run's."""
    stage = _stage(dropout=0.1, micro_batch=4, accumulation=2, zero_stage=zero_stage, max_steps=20, learning_rate=1e-3)
    data = corpus.blocks[:40]  # 10 micro-batches an epoch: the 14 below cross into the next epoch
    saved_at, stop = 3, 7
    engine = pretrain._setup_engine(stage, corpus.tokenizer, SEED)
    masker = pretrain._Targets(corpus.tokenizer, "mlm", stage.mlm_probability, seed=SEED)
    loss = _train(engine, masker, data, stage, start=0, stop=saved_at)[-1]
    pretrain._save_checkpoint(engine, masker, tmp_path, 0, step=saved_at, loss=loss)
    uninterrupted = _train(engine, masker, data, stage, start=saved_at, stop=stop)

    torch.manual_seed(12345)  # the process's RNGs move on, as in a restarted worker
    fresh = pretrain._setup_engine(stage, corpus.tokenizer, SEED + 1)  # other weights until the load
    fresh_masker = pretrain._Targets(corpus.tokenizer, "mlm", stage.mlm_probability, seed=SEED + 1)
    assert pretrain._load_checkpoint(fresh, fresh_masker, tmp_path, 0) == (saved_at, loss)
    assert fresh.global_steps == saved_at
    resumed = _train(fresh, fresh_masker, data, stage, start=saved_at, stop=stop)

    assert resumed == pytest.approx(uninterrupted, abs=1e-6)
    assert _max_difference(_weights(fresh), _weights(engine)) <= 1e-6
    assert fresh.get_lr() == engine.get_lr() and fresh.global_steps == engine.global_steps == stop
    assert len(set(uninterrupted)) == len(uninterrupted)  # the steps did train: no repeated loss


class _RunsOnLoad:
    """What a tampered checkpoint could carry: unpickling it runs a shell command."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


@pytest.mark.parametrize("zero_stage", [0, 2], ids=["zero0", "zero2"])
def test_a_checkpoint_that_would_run_code_when_loaded_is_refused(
    corpus: Corpus, tmp_path: Path, zero_stage: int
) -> None:
    """DeepSpeed's own loader unpickles everything; ours loads data only (weights_only=True)."""
    stage = _stage(zero_stage=zero_stage, max_steps=4)
    engine = pretrain._setup_engine(stage, corpus.tokenizer, SEED)
    masker = pretrain._Targets(corpus.tokenizer, "mlm", stage.mlm_probability, seed=SEED)
    pretrain._save_checkpoint(engine, masker, tmp_path, 0, step=1, loss=1.0)
    mark = tmp_path / "the-code-ran"
    for saved in sorted(tmp_path.rglob("*_states.pt")):  # the model's and, under ZeRO, the optimizer's
        state = torch.load(saved, weights_only=False)  # our own file, just written
        torch.save({**state, "extra": _RunsOnLoad(mark)}, saved)
        with pytest.raises(pickle.UnpicklingError, match=r"unsupported GLOBAL posix\.system"):
            pretrain._load_checkpoint(engine, masker, tmp_path, 0)
        assert not mark.exists()
        torch.save(state, saved)
    assert pretrain._load_checkpoint(engine, masker, tmp_path, 0) == (1, 1.0)  # the untampered files load


# --------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class Task:
    pretrained_dir: Path
    task_dir: Path
    label_names: list[str]


@pytest.fixture(scope="module")
def task(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Task:
    """What fit_classifier reads: an HF folder of a (randomly initialised) 2-layer BERT with its
    tokenizer, and the task splits as the tokenize stage writes them (`tokenize_examples`).

    Validation and test are held-out rows of the synthetic *train* distribution (other seeds): its
    real validation split uses adjectives the train split never shows, which only a pre-trained
    encoder can label."""
    folder = tmp_path_factory.mktemp("task")
    model = models.build_lm(
        ModelConfig(family="bert"),
        vocab_size=len(corpus.tokenizer),
        special_ids=special_ids(corpus.tokenizer),
        seed=SEED,
    )
    model.save_pretrained(folder / "pretrained")
    corpus.tokenizer.save_pretrained(folder / "pretrained")
    splits = {
        "train": synthetic.generate("train", 128, seed=SEED),
        "validation": synthetic.generate("train", 64, seed=SEED + 1),
        "test": synthetic.generate("train", 32, seed=SEED + 2),
    }
    values = tok.label_vocabulary(pa.Table.from_pylist(splits["train"]))
    for name, rows in splits.items():
        (folder / "task" / name).mkdir(parents=True)
        table = tok.tokenize_examples(
            pa.Table.from_pylist(rows), tokenizer_dir=str(corpus.tokenizer_dir), seq_len=SEQ_LEN, label_values=values
        )
        pq.write_table(table, folder / "task" / name / "part-0.parquet")
    return Task(folder / "pretrained", folder / "task", values)


def _classifier_run(
    task: Task, *, epochs: int, dropout: float, export: bool = False, learning_rate: float = 5e-3
) -> finetune.ClassifierRun:
    return finetune.ClassifierRun(
        pretrained_dir=str(task.pretrained_dir),
        task_dir=str(task.task_dir),
        label_names=task.label_names,
        epochs=epochs,
        hyper=Hyperparameters(learning_rate=learning_rate, batch_size_per_worker=8, dropout=dropout),
        deepspeed=DeepSpeedConfig(),
        threads=THREADS,
        log_every=4,
        seed=SEED,
        export=export,
    )


@dataclass
class Fit:
    """What `fit_classifier` handed its report callable: each epoch's metrics and checkpoint."""

    folder: Path
    reports: list[dict]
    checkpoints: dict[int, Path]

    def __call__(self, metrics: dict, checkpoint_dir: str) -> None:
        # The folder is temporary (a Ray report uploads it): keep a copy to restore from.
        self.reports.append(metrics)
        copy = shutil.copytree(checkpoint_dir, self.folder / f"epoch{metrics['epoch']}")
        self.checkpoints[int(metrics["epoch"])] = Path(copy)


def _fit(cfg: finetune.ClassifierRun, folder: Path, checkpoint: Path | None = None) -> Fit:
    fit = Fit(folder, [], {})
    restored = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
    final = finetune.fit_classifier(cfg, report=fit, checkpoint=restored)
    assert final == fit.reports[-1]
    return fit


@pytest.fixture(scope="module")
def fitted(task: Task, tmp_path_factory: pytest.TempPathFactory) -> Fit:
    # No dropout: see test_fit_classifier_resumes_dropout_as_an_uninterrupted_run_would.
    return _fit(_classifier_run(task, epochs=3, dropout=0.0, export=True), tmp_path_factory.mktemp("fit"))


def test_fit_classifier_learns_the_synthetic_task(fitted: Fit) -> None:
    first, last = fitted.reports[0], fitted.reports[-1]
    assert [report["epoch"] for report in fitted.reports] == [1, 2, 3]
    assert last["train/epoch_loss"] < 0.5 * first["train/epoch_loss"]
    # A classifier at chance scores ln 2 = 0.69 on two balanced labels, and half of them right.
    assert last["eval/loss"] < 0.5 * math.log(2) and last["eval/loss"] < first["eval/loss"] - 0.2
    assert last["eval/accuracy"] >= 0.9 and last["test/accuracy"] >= 0.9
    assert "test/accuracy" not in first  # export evaluates on test after the last epoch only
    exported = models.smoke_test(fitted.checkpoints[3] / "hf", "classifier")
    assert exported["parameters"] > 0


@pytest.mark.parametrize("family, learning_rate", [("t5", 5e-3), ("bart", 1e-3)])
def test_fit_classifier_fine_tunes_an_encoder_decoder_pre_training(
    task: Task, corpus: Corpus, tmp_path: Path, family: str, learning_rate: float
) -> None:
    """An encoder-decoder pre-training feeds a sentence classification task (T5- or
    BartForSequenceClassification, which read the decoder's state at the closing [SEP]) and learns
    it like the encoder does. BART's post-norm layers want a lower rate: at 5e-3 it stays at chance."""
    pretrained = tmp_path / family
    model = models.build_lm(
        ModelConfig(family=family),
        vocab_size=len(corpus.tokenizer),
        special_ids=special_ids(corpus.tokenizer),
        seed=SEED,
    )
    model.save_pretrained(pretrained)
    corpus.tokenizer.save_pretrained(pretrained)
    assert models.smoke_test(pretrained, "span")["parameters"] == models.count_parameters(model)
    family_task = Task(pretrained, task.task_dir, task.label_names)
    run = _classifier_run(family_task, epochs=5, dropout=0.0, export=True, learning_rate=learning_rate)
    fit = _fit(run, tmp_path / "fit")
    assert fit.reports[-1]["eval/accuracy"] >= 0.9 and fit.reports[-1]["test/accuracy"] >= 0.9
    assert fit.reports[-1]["train/epoch_loss"] < 0.5 * fit.reports[0]["train/epoch_loss"]
    assert models.smoke_test(fit.checkpoints[5] / "hf", "classifier")["parameters"] > 0


def test_fit_classifier_resumes_after_the_checkpointed_epoch(fitted: Fit, task: Task, tmp_path: Path) -> None:
    """From the epoch-2 checkpoint a new attempt trains epoch 3 only, and ends where the
    uninterrupted run did: same weights, optimizer, schedule position and data order."""
    resumed = _fit(_classifier_run(task, epochs=3, dropout=0.0, export=True), tmp_path, fitted.checkpoints[2])
    assert [report["epoch"] for report in resumed.reports] == [3]
    assert resumed.reports[0] == pytest.approx(fitted.reports[2], abs=1e-6)


def test_early_stopping_exports_the_best_epoch_also_after_a_restore(task: Task, tmp_path: Path) -> None:
    """With early stopping the exported model is the best epoch by the run's ranking (the sweep's
    rule), with its scores, not the one `patience` epochs later; a run restored after that epoch
    exports it too. min_delta=10: no epoch after the first lowers the loss enough, so the run stops
    after epoch 3; ranked on the highest loss (a rule that favours an early epoch here), the export is
    an earlier epoch than the last."""
    run = _classifier_run(task, epochs=3, dropout=0.0, export=True).model_copy(
        update={
            "early_stopping_patience": 2,
            "early_stopping_min_delta": 10.0,
            "ranking": Ranking(metric="eval/loss", mode="max"),
        }
    )
    fit = _fit(run, tmp_path / "fit")
    last = fit.reports[-1]
    assert [report["epoch"] for report in fit.reports] == [1, 2, 3] and last["early_stop/lowest_loss_epoch"] == 1
    # The first of equals: the last report carries the exported epoch's scores, not epoch 3's own.
    chosen = max(fit.reports, key=lambda report: report["eval/loss"])
    assert chosen["epoch"] < 3 and last["model/epoch"] == chosen["epoch"]
    assert last["eval/loss"] == chosen["eval/loss"] and last["eval/accuracy"] == chosen["eval/accuracy"]
    assert all("test/accuracy" not in report for report in fit.reports[:-1]) and 0 <= last["test/accuracy"] <= 1
    weights = "model.safetensors"
    best = (fit.checkpoints[chosen["epoch"]] / "hf" / weights).read_bytes()
    assert (fit.checkpoints[3] / "hf" / weights).read_bytes() == best
    # Without early stopping the last epoch is exported, and its weights differ from the chosen one's.
    later = _fit(run.model_copy(update={"early_stopping_patience": None}), tmp_path / "no-stopping")
    assert "model/epoch" not in later.reports[-1]
    assert (later.checkpoints[3] / "hf" / weights).read_bytes() != best
    resumed = _fit(run, tmp_path / "resumed", fit.checkpoints[2])
    assert [report["epoch"] for report in resumed.reports] == [3]
    assert resumed.reports[0]["model/epoch"] == chosen["epoch"]
    assert (resumed.checkpoints[3] / "hf" / weights).read_bytes() == best
    assert resumed.reports[0]["test/accuracy"] == last["test/accuracy"]


def test_fit_classifier_resumes_dropout_as_an_uninterrupted_run_would(task: Task, tmp_path: Path) -> None:
    """With dropout, the epoch after a restore must draw what the uninterrupted run drew (restore_rng)."""
    cfg = _classifier_run(task, epochs=2, dropout=0.1)
    uninterrupted = _fit(cfg, tmp_path / "uninterrupted")
    resumed = _fit(cfg, tmp_path / "resumed", uninterrupted.checkpoints[1])
    assert resumed.reports[0] == pytest.approx(uninterrupted.reports[1], abs=1e-6)


def test_training_processes_never_build_deepspeeds_inference_only_cpu_op(tmp_path: Path, monkeypatch) -> None:
    """Loading it takes torch's build lock, which a killed worker leaves behind for every later one."""
    from deepspeed.comm.torch import build_shm_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    accelerator.prepare_process(use_gpu=False)
    assert build_shm_op() is None
    assert not list(tmp_path.iterdir())  # nothing compiled, no lock taken


def test_a_loss_that_turns_non_finite_stops_fine_tuning_at_that_step(task: Task, tmp_path: Path) -> None:
    run = _classifier_run(task, epochs=2, dropout=0.0).model_copy(
        update={"hyper": Hyperparameters(learning_rate=1e12, batch_size_per_worker=8)}
    )
    reports = []
    with pytest.raises(training.Diverged) as diverged:
        finetune.fit_classifier(run, report=lambda metrics, _: reports.append(metrics))
    assert not math.isfinite(diverged.value.loss) and 1 <= diverged.value.step <= 16  # 16 steps an epoch
    assert reports == []  # stopped at once: no epoch finished after the divergence


def test_a_reported_divergence_fails_the_stage_naming_step_and_checkpoint(tmp_path: Path) -> None:
    from ray.train import Checkpoint, Result

    good = Checkpoint.from_directory(str(tmp_path / "checkpoint_000002"))
    result = Result(metrics={"train/loss": 1.0}, checkpoint=good, error=None, path="")
    marker = tmp_path / "out" / "diverged.json"
    training.raise_if_diverged(result, marker, "pretrain")  # no marker: nothing to say
    training.report_divergence(training.Diverged(120, float("nan")), str(marker))
    with pytest.raises(RuntimeError, match=r"pretrain: the training loss became nan at step 120; .*checkpoint_000002"):
        training.raise_if_diverged(result, marker, "pretrain")


def test_evaluation_over_ranks_counts_every_row_once() -> None:
    """Two ranks, five rows: the fifth was in no rank's evaluation (each split lost up to one row
    a rank but one; SQuAD's test windows on 2 workers lost a question). Now the rank a row short
    forwards a repeat with the other's last batch and does not count it: each rank scores exactly
    its own rows."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).eval()
    split = {
        "input_ids": torch.randint(5, 50, (5, 8)),
        "attention_mask": torch.ones(5, 8, dtype=torch.long),
        "label": torch.tensor([0, 1, 1, 0, 1]),
    }
    kind = task_type("sequence_classification")

    def evaluated(shard: training.Shard, rows: list[int]) -> dict[str, float]:
        part = {column: values[rows] for column, values in split.items()}
        return finetune.evaluate(model, part, shard, kind=kind, label_names=["negative", "positive"])

    everything = list(range(5))
    assert evaluated(training.Shard(0, 2, 2), everything) == evaluated(training.Shard(0, 1, 2), [0, 2, 4])
    assert evaluated(training.Shard(1, 2, 2), everything) == evaluated(training.Shard(0, 1, 2), [1, 3])
