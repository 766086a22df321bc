"""A fine-tuned model answering texts as its task type does: what a Serve replica, `ptft explain`
and a `ptft predict` worker hold. Free of Ray Serve and FastAPI, which batch workers never use."""

from __future__ import annotations

import threading

from components.schemas import ServeConfig
from components.scratch import ScratchFolder
from components.tasks import load_model_folder, task_of_model


class Scorer:
    """Tokenizer + fine-tuned model; answers a list of texts in one padded forward pass, as its
    task type does (components/tasks/)."""

    def __init__(self, model_uri: str, tracking_uri: str | None, threads: int = 1, max_batch_tokens: int | None = None):
        import torch

        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_classifier(model_uri, tracking_uri)
        self.model.eval()
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
        self.max_tokens = int(min(positions, self.tokenizer.model_max_length))
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.task = task_of_model(config)
        self.max_batch_tokens = max_batch_tokens or ServeConfig().max_batch_tokens
        # Batches and /explain run in worker threads; one forward at a time (explain switches the
        # model's attention implementation while it runs).
        self._model_lock = threading.Lock()

    def __call__(self, texts: list) -> list[dict]:
        """Every text's answer (a question and context for a reader, a list of words for a tagger
        in `ptft predict`), in order, from forward passes of at most `max_batch_tokens` padded
        tokens each: a batch of many long texts never becomes one huge tensor."""
        if len(texts) * self.max_tokens <= self.max_batch_tokens:  # fits even padded to the limit: one pass
            parts = [list(range(len(texts)))]
        else:
            lengths = self.task.token_lengths(self.tokenizer, texts, self.max_tokens)
            parts = token_budget_parts(lengths, self.max_batch_tokens)
        answers: list[dict | None] = [None] * len(texts)
        for part in parts:
            with self._model_lock:  # per part: /explain may run between the parts of a long batch
                scored = self.task.predict(self.model, self.tokenizer, [texts[i] for i in part], self.max_tokens)
            for index, answer in zip(part, scored, strict=True):
                answers[index] = answer
        return answers

    def explain(self, texts: list[str], layer: int = -1) -> list[dict]:
        """The task type's attention maps (components/explain.py)."""
        with self._model_lock:
            return self.task.explain(self.model, self.tokenizer, texts, max_tokens=self.max_tokens, layer=layer)


def token_budget_parts(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of texts with these token lengths, grouped so that each group padded to its longest
    text holds at most `budget` tokens (a text longer than the budget alone). Similar lengths go
    together, which also cuts the padding."""
    parts: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Sorted ascending: the text joining a part is its longest.
        if parts and (len(parts[-1]) + 1) * lengths[index] <= budget:
            parts[-1].append(index)
        else:
            parts.append([index])
    return parts


def load_classifier(model_uri: str, tracking_uri: str | None):
    """(model, tokenizer) from the registry (`models:/NAME/VERSION`) or a Hugging Face folder."""
    if model_uri.startswith("models:/"):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        # Downloaded once into a folder removed once loaded (or after a replica killed meanwhile,
        # components/scratch.py): MLflow's own loaders download into temporary folders they never
        # remove, a copy of the model on the replica's disk at every replica start.
        with ScratchFolder("model") as folder:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder))
            if "transformers" not in mlflow.models.Model.load(local).flavors:  # registry.TaskModel
                wrapped = mlflow.pyfunc.load_model(local).unwrap_python_model()
                return wrapped.model, wrapped.tokenizer
            components = mlflow.transformers.load_model(local, return_type="components")
            return components["model"], components["tokenizer"]
    return load_model_folder(model_uri)
