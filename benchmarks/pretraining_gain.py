"""Does pre-training help? Fine-tune the same classifier twice on the same splits: from the
pipeline's pre-trained encoder, and from a randomly initialised encoder of the same architecture
(the baseline, in the same run). Prints both test accuracies and their ratio.

For the demo's synthetic data it also prints what the masked LM learned: in
"the film was <adjective> and [MASK] .", the share of the adjective probability mass the model puts
on adjectives of the same polarity (0.5 = it did not learn polarity).

    python benchmarks/pretraining_gain.py [STORAGE]     # STORAGE of a finished `ptft run`
                                                              # (default ./ptft-runs)
Runs in-process on one DeepSpeed rank; takes a minute or two for the demo's tiny model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForMaskedLM, PreTrainedTokenizerFast  # noqa: E402

from components import finetune, synthetic, training  # noqa: E402
from components.schemas import DeepSpeedConfig, Hyperparameters  # noqa: E402
from components.stage import read_json  # noqa: E402


def latest(folder: Path) -> Path:
    candidates = [p for p in folder.iterdir() if (p / "_SUCCESS").is_file()]
    if not candidates:
        sys.exit(f"no finished artifact under {folder}: run `ptft run configs/demo.yaml` first")
    return max(candidates, key=lambda p: (p / "_SUCCESS").stat().st_mtime)


def random_twin(pretrained: Path, out: Path) -> Path:
    """Same architecture and tokenizer as the pre-trained folder, weights freshly initialised."""
    model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(pretrained))
    model.save_pretrained(out)
    PreTrainedTokenizerFast.from_pretrained(pretrained).save_pretrained(out)
    return out


@torch.no_grad()
def polarity_agreement(model_dir: Path) -> float:
    """Mean share of adjective mass on the context adjective's polarity, over all adjectives."""
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    groups = [tokenizer.convert_tokens_to_ids(words) for words in (synthetic.NEGATIVE, synthetic.POSITIVE)]
    shares = []
    for polarity, words in enumerate((synthetic.NEGATIVE, synthetic.POSITIVE)):
        for word in words:
            encoded = tokenizer(f"the film was {word} and [MASK] .", return_tensors="pt")
            position = int((encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0])
            probabilities = model(**encoded).logits[0, position].softmax(-1)
            same, other = (probabilities[groups[polarity]].sum(), probabilities[groups[1 - polarity]].sum())
            shares.append(float(same / (same + other)))
    return sum(shares) / len(shares)


def test_accuracy(pretrained: Path, tokenized: Path, hyper: Hyperparameters, epochs: int, seed: int) -> float:
    run = finetune.ClassifierRun(
        pretrained_dir=str(pretrained),
        task_dir=str(tokenized / "task"),
        label_names=read_json(tokenized / "labels.json"),
        epochs=epochs,
        hyper=hyper,
        deepspeed=DeepSpeedConfig(zero_stage=0),
        seed=seed,
        export=True,
    )
    metrics = finetune.fit_classifier(run, report=lambda metrics, checkpoint: None)
    return metrics["test/accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("storage", nargs="?", default="ptft-runs")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()
    artifacts = Path(args.storage) / "artifacts"
    tokenized, pretrained = latest(artifacts / "prepare"), latest(artifacts / "pretrain") / "model"
    hyper = Hyperparameters(learning_rate=args.learning_rate, batch_size_per_worker=8)
    training.ensure_process_group()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = random_twin(pretrained, Path(tmp) / "random")
        agreement = polarity_agreement(pretrained), polarity_agreement(scratch)
        rows = []
        for seed in range(args.seeds):
            rows.append(
                (
                    test_accuracy(pretrained, tokenized, hyper, args.epochs, seed),
                    test_accuracy(scratch, tokenized, hyper, args.epochs, seed),
                )
            )
    with_pre, without = statistics.mean(r[0] for r in rows), statistics.mean(r[1] for r in rows)
    print(f"test accuracy, pre-trained encoder : {with_pre:.4f}  (per seed {[round(r[0], 4) for r in rows]})")
    print(f"test accuracy, random encoder      : {without:.4f}  (per seed {[round(r[1], 4) for r in rows]})")
    print(f"ratio pre-trained / random          : {with_pre / without:.3f}")
    print(f"MLM polarity agreement, pre-trained : {agreement[0]:.3f}  (random encoder: {agreement[1]:.3f})")


if __name__ == "__main__":
    main()
