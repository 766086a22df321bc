"""ptft stage library: data, tokenizer, models, DeepSpeed training, tune, finetune, serve, tracking.

Nothing here imports from `pipelines/`; the pipeline layer wires these stages together.
"""
