"""Model builders: BERT-style encoders (masked-LM), GPT-2-style decoders (causal-LM) and T5- or
BART-style encoder-decoders (span corruption) from size presets or from a checkpoint, masking and span
corruption, the load + forward smoke test and the weights hash."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BartConfig,
    BertConfig,
    GPT2Config,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
)
from transformers.modeling_outputs import MaskedLMOutput

from components.schemas import MASKED_LM_TYPES, SPAN_CORRUPTION_TYPES, ModelConfig, objective_of
from components.stage import weights_sha256  # noqa: F401 - the model's identity, kept importable here


def build_config(cfg: ModelConfig, *, vocab_size: int, special_ids: dict[str, int | None]) -> PretrainedConfig:
    """The HF config of a new model of the configured family and sizes."""
    sizes = cfg.resolved()
    if cfg.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=sizes["hidden_size"],
            n_layer=sizes["num_layers"],
            n_head=sizes["num_heads"],
            n_inner=sizes["intermediate_size"],
            n_positions=sizes["max_positions"],
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=special_ids.get("bos"),
            eos_token_id=special_ids.get("eos"),
            pad_token_id=special_ids.get("pad"),
        )
    if cfg.family == "t5":
        return T5Config(
            vocab_size=vocab_size,
            d_model=sizes["hidden_size"],
            d_kv=sizes["hidden_size"] // sizes["num_heads"],
            d_ff=sizes["intermediate_size"],
            num_layers=sizes["num_layers"],
            num_heads=sizes["num_heads"],
            dropout_rate=cfg.dropout,
            pad_token_id=special_ids.get("pad"),
            eos_token_id=special_ids.get("eos"),
            decoder_start_token_id=special_ids.get("pad"),  # T5's convention: the decoder starts at pad
        )
    if cfg.family == "bart":
        return BartConfig(
            vocab_size=vocab_size,
            d_model=sizes["hidden_size"],
            encoder_layers=sizes["num_layers"],
            decoder_layers=sizes["num_layers"],
            encoder_attention_heads=sizes["num_heads"],
            decoder_attention_heads=sizes["num_heads"],
            encoder_ffn_dim=sizes["intermediate_size"],
            decoder_ffn_dim=sizes["intermediate_size"],
            max_position_embeddings=sizes["max_positions"],
            dropout=cfg.dropout,
            scale_embedding=True,  # embeddings x sqrt(hidden), as the original Transformer
            pad_token_id=special_ids.get("pad"),
            bos_token_id=special_ids.get("bos"),
            eos_token_id=special_ids.get("eos"),
            decoder_start_token_id=special_ids.get("bos"),  # the decoder starts at the start token
            forced_bos_token_id=None,  # BART's defaults force ids of its own vocabulary
            forced_eos_token_id=None,
        )
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"],
        intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=sizes["max_positions"],
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=special_ids.get("pad"),
    )


def objective_for(cfg: ModelConfig) -> str:
    """mlm or clm: the family's, or for `init_from` the checkpoint's model type's."""
    if cfg.init_from:
        return objective_of(AutoConfig.from_pretrained(cfg.init_from, revision=cfg.init_revision).model_type)
    return cfg.objective


def lm_class(objective: str):
    return {"mlm": AutoModelForMaskedLM, "span": AutoModelForSeq2SeqLM}.get(objective, AutoModelForCausalLM)


def build_lm(cfg: ModelConfig, *, vocab_size: int, special_ids: dict[str, int | None], seed: int) -> PreTrainedModel:
    """The model to pre-train: new weights from the preset, or the `init_from` checkpoint's."""
    torch.manual_seed(seed)
    if cfg.init_from:
        model_type = AutoConfig.from_pretrained(cfg.init_from, revision=cfg.init_revision).model_type
        # A checkpoint without this objective's head (e.g. a sentence encoder) gets a new one;
        # the configured dropout applies to the checkpoint too.
        model = lm_class(objective_of(model_type)).from_pretrained(
            cfg.init_from,
            revision=cfg.init_revision,
            attn_implementation=cfg.attention,
            use_safetensors=True,  # weights are data: never a pickle that can run code on load
            **dropout_overrides(model_type, cfg.dropout),
        )
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = special_ids.get("pad")
        return model
    config = build_config(cfg, vocab_size=vocab_size, special_ids=special_ids)
    return lm_class(cfg.objective).from_config(config, attn_implementation=cfg.attention)


def dropout_overrides(model_type: str, dropout: float, attention_dropout: float | None = None) -> dict[str, float]:
    """Config keys that set hidden and attention dropout for this model type (attention dropout
    defaults to the hidden one)."""
    attention = dropout if attention_dropout is None else attention_dropout
    if model_type == "gpt2":
        return {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": attention}
    if model_type in MASKED_LM_TYPES:
        return {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": attention}
    if model_type == "bart":
        return {"dropout": dropout, "attention_dropout": attention}
    if model_type in SPAN_CORRUPTION_TYPES:
        return {"dropout_rate": dropout}  # one rate for every T5 dropout, attention's included
    return {}


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of the non-special tokens as targets; of those, 80% become
    [MASK], 10% a random token, 10% stay. Returns (inputs, labels) with -100 on non-targets."""
    labels = input_ids.clone()
    special = torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype))
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    inputs = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs[chosen & (roll < 0.8)] = mask_token_id
    randomize = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomize] = torch.randint(
        len(special_ids), vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype
    )[randomize]
    return inputs, labels


SENTINEL = re.compile(r"<extra_id_(\d+)>")


def sentinel_ids(tokenizer) -> list[int]:
    """The ids of the tokenizer's sentinels <extra_id_0>, <extra_id_1>, ... in that order."""
    found = {int(match[1]): token for token in tokenizer.get_vocab() if (match := SENTINEL.fullmatch(token))}
    return tokenizer.convert_tokens_to_ids([found[number] for number in sorted(found)])


def corrupt_spans(
    input_ids: torch.Tensor,
    *,
    noise_density: float,
    mean_span_length: float,
    sentinel_ids: list[int],
    eos_id: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's span corruption: in each row, `noise_density` of the tokens, in spans of
    `mean_span_length` on average, are cut out. The input keeps the rest with one sentinel where
    each span was; the target lists each sentinel followed by the span it replaced. Both end with
    `eos_id`. Every row of a block batch has the same length, so no padding is needed:
    inputs [rows, kept + spans + 1], labels [rows, corrupted + spans + 1].

        tokens:  a b c d e f g h      inputs:  a <0> d e f <1> h </s>
        noise:       ^ ^       ^ ^    labels:  <0> b c <1> g </s>   (with spans [b c] and [g])
    """
    length = input_ids.shape[1]
    inputs, labels = [], []
    sentinels = torch.tensor(sentinel_ids, dtype=input_ids.dtype)
    for row in input_ids:
        noise = span_noise_mask(length, noise_density, mean_span_length, generator)
        starts = noise & ~torch.cat([torch.tensor([False]), noise[:-1]])
        if int(starts.sum()) > len(sentinel_ids):
            raise ValueError(
                f"span corruption masks {int(starts.sum())} spans per block but the tokenizer has "
                f"{len(sentinel_ids)} sentinel tokens: raise tokenize.sentinels"
            )
        span = torch.cumsum(starts, 0) - 1  # each noise token's span number
        inputs.append(torch.cat([_with_sentinels(row, ~noise, starts, span, sentinels), row.new_tensor([eos_id])]))
        labels.append(torch.cat([_with_sentinels(row, noise, starts, span, sentinels), row.new_tensor([eos_id])]))
    return torch.stack(inputs), torch.stack(labels)


def _with_sentinels(
    row: torch.Tensor, keep: torch.Tensor, starts: torch.Tensor, span: torch.Tensor, sentinels: torch.Tensor
) -> torch.Tensor:
    """`row`'s kept tokens, each span's sentinel placed at its first noise token (before the span's
    tokens when they are kept, in place of them when they are not)."""
    pieces = []
    for position in range(len(row)):
        if starts[position]:
            pieces.append(sentinels[span[position]])
        if keep[position]:
            pieces.append(row[position])
    return torch.stack(pieces)


def span_noise_mask(
    length: int, noise_density: float, mean_span_length: float, generator: torch.Generator
) -> torch.Tensor:
    """Which of `length` tokens are corrupted: kept and corrupted runs alternate, a kept run first,
    the run lengths random (T5's random_spans_noise_mask)."""
    noise = min(max(1, round(length * noise_density)), length - 1)
    spans = max(1, min(round(noise / mean_span_length), noise, length - noise))
    mask = []
    for kept, corrupted in zip(
        _segments(length - noise, spans, generator), _segments(noise, spans, generator), strict=True
    ):
        mask += [False] * kept + [True] * corrupted
    return torch.tensor(mask)


def _segments(items: int, count: int, generator: torch.Generator) -> list[int]:
    """`items` cut into `count` non-empty runs at random places."""
    cuts = sorted((torch.randperm(items - 1, generator=generator)[: count - 1] + 1).tolist())
    bounds = [0, *cuts, items]
    return [end - start for start, end in zip(bounds, bounds[1:], strict=False)]


def count_parameters(model: torch.nn.Module) -> int:
    # ZeRO-3 partitions each tensor; ds_numel is its full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


@torch.no_grad()
def smoke_test(model_dir: Path, kind: str, text: str = "a short sample text .") -> dict[str, float | str]:
    """Load the exported folder as users will (`AutoModel*.from_pretrained`) and run one forward.

    `kind` is mlm, clm, classifier or a task type's transformers class name (e.g.
    AutoModelForTokenClassification). Returns the weights hash and parameter count.

    Raises:
        RuntimeError: the folder does not load, or the forward gives non-finite outputs.
    """
    import transformers

    named = {
        "mlm": AutoModelForMaskedLM,
        "clm": AutoModelForCausalLM,
        "span": AutoModelForSeq2SeqLM,
        "classifier": AutoModelForSequenceClassification,
    }
    auto = named[kind] if kind in named else getattr(transformers, kind)
    try:
        model = auto.from_pretrained(model_dir, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:  # noqa: BLE001 - corrupt files raise OSError, ValueError, SafetensorError, ...
        raise RuntimeError(f"the exported model in {model_dir} does not load with {auto.__name__}: {error}") from error
    inputs = tokenizer([text], return_tensors="pt", truncation=True, max_length=32)
    if kind in ("clm", "span"):
        inputs.pop("token_type_ids", None)  # decoders take no segment ids
    if type(model).__name__.endswith("ForConditionalGeneration"):  # a decoder to feed (classifiers feed their own)
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    output = model(**inputs)
    logits = output.logits if "logits" in output else torch.stack([output.start_logits, output.end_logits])
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the exported model in {model_dir} gives non-finite outputs")
    return {"weights_sha256": weights_sha256(model_dir), "parameters": count_parameters(model)}


# Where each model type's masked-LM head lives (its ForMaskedLM class's attribute, taking the
# encoder's hidden states): those types score only the target positions in training.
MLM_HEADS = {"bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "mpnet": "lm_head"}


def score_targets_only(model: PreTrainedModel) -> bool:
    """Make a masked LM's training forward (called with `labels`) run its head over the target
    positions only, not over every token: the vocabulary projection of the ~85% of positions
    without a label is work whose result the loss never reads (1.27x the tokens/s of BERT-base on
    an H200, docs/performance.md). The loss is the same mean cross-entropy over the targets; a call
    without labels, and the saved model, are the model's own. Returns False for a model type
    whose head is not known (MLM_HEADS): it keeps scoring every position."""
    head_name = MLM_HEADS.get(model.config.model_type)
    if head_name is None or not hasattr(model, head_name):
        return False
    encoder, head, full_forward = model.base_model, getattr(model, head_name), model.forward

    def forward(input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return full_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        targets = labels != -100
        scores = head(hidden[targets])  # (targets, vocab), not (tokens, vocab)
        return MaskedLMOutput(loss=torch.nn.functional.cross_entropy(scores.float(), labels[targets]))

    model.forward = forward  # on this instance: its class, weights and save_pretrained are untouched
    return True
