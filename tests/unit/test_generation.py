"""Generation: next-token labels, the batched decoding loop (per-row sampling, seeds, end token,
budget, deadline), nucleus sampling, streamed text deltas, and the task's config rules, on a tiny
GPT-2 built here."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from components import models
from components import tokenize as tok
from components.generation import DEADLINE, LENGTH, STOP, Ask, Decoding, TextDelta, nucleus_sample, prompt_ids
from components.schemas import ModelConfig, TaskConfig, TokenizeConfig
from components.tasks import IGNORE, task_of_model, task_type
from components.vocab import special_ids

GENERATION = task_type("generation")
TEXTS = ["the film is a moving portrait of a town .", "a dull and tedious plot .", "the cast is superb ."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("gpt")
    tokenizer = tok.train_tokenizer(TEXTS * 5, TokenizeConfig(algorithm="bpe", vocab_size=120, min_frequency=1))
    tokenizer.save_pretrained(folder)
    tokenizer = tok._load_tokenizer(str(folder))
    cfg = ModelConfig(family="gpt2", max_positions=64)
    model = models.build_lm(cfg, vocab_size=len(tokenizer), special_ids=special_ids(tokenizer), seed=0).eval()
    return model, tokenizer, str(folder)


def test_each_position_learns_the_next_token_of_one_document(tiny) -> None:
    model, tokenizer, folder = tiny
    out = tok.tokenize_examples(
        pa.table({"text": TEXTS, "label": TEXTS}), tokenizer_dir=folder, seq_len=12, label_values=[], task="generation"
    )
    for row, text in enumerate(TEXTS):
        ids, labels = out.column("input_ids")[row].as_py(), out.column("label")[row].as_py()
        length = sum(out.column("attention_mask")[row].as_py())
        assert ids[0] == tokenizer.cls_token_id and ids[length - 1] == tokenizer.sep_token_id
        assert labels[: length - 1] == ids[1:length]  # each position: the token after it
        assert labels[length - 1 :] == [IGNORE] * (12 - length + 1)
        if length < 12:  # not cut: the whole text is there
            assert tokenizer.decode(ids[:length], skip_special_tokens=True) == tokenizer.decode(
                tokenizer(text, add_special_tokens=False)["input_ids"]
            )


def test_the_saved_decoder_is_served_as_a_generation_model(tiny, tmp_path: Path) -> None:
    from transformers import AutoConfig

    model, _, _ = tiny
    model.save_pretrained(tmp_path)
    assert task_of_model(AutoConfig.from_pretrained(tmp_path)) is GENERATION


def test_a_batch_decodes_what_each_prompt_decodes_alone(tiny) -> None:
    """Left padding and the KV cache change nothing: greedy rows in a batch of different prompt
    lengths equal the same prompts decoded alone, and equal transformers' own greedy search."""
    model, tokenizer, _ = tiny
    prompts = [prompt_ids(tokenizer, text) for text in ("the film", "a dull and tedious", "the cast is superb")]
    together = Decoding(model, tokenizer, [Ask(ids, 6, temperature=0.0) for ids in prompts]).run()
    for ids, row in zip(prompts, together, strict=True):
        alone = Decoding(model, tokenizer, [Ask(ids, 6, temperature=0.0)]).run()[0]
        assert row.ids == alone.ids and row.text == alone.text
        reference = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
        assert alone.ids == [token for token in reference if token != tokenizer.sep_token_id][: len(alone.ids)]


def test_rows_end_at_their_budget_and_the_same_seed_gives_the_same_text(tiny) -> None:
    model, tokenizer, _ = tiny
    ids = prompt_ids(tokenizer, "the film")
    asks = [Ask(ids, 3, temperature=1.0, seed=7), Ask(ids, 9, temperature=1.0, seed=7), Ask(ids, 9, seed=8)]
    rows = Decoding(model, tokenizer, asks).run()
    assert len(rows[0].ids) <= 3 and rows[0].finish_reason in (LENGTH, STOP)
    assert rows[1].ids[: len(rows[0].ids)] == rows[0].ids  # one seed, one stream of draws
    again = Decoding(model, tokenizer, [Ask(ids, 9, temperature=1.0, seed=7)]).run()[0]
    assert again.ids == rows[1].ids


def test_a_row_past_its_deadline_stops_and_the_others_go_on(tiny) -> None:
    model, tokenizer, _ = tiny
    ids = prompt_ids(tokenizer, "the film")
    late = Ask(ids, 50, temperature=1.0, seed=1, deadline=time.monotonic() - 1)
    on_time = Ask(ids, 5, temperature=0.0)
    decoding = Decoding(model, tokenizer, [late, on_time])
    assert decoding.step() == [0, 1]  # the late row ends at the first step, without a token
    assert decoding.rows[0].finish_reason == DEADLINE and decoding.rows[0].ids == []
    rows = decoding.run()
    assert rows[1].finish_reason in (LENGTH, STOP) and rows[0].ids == []


def test_nucleus_sampling_draws_only_from_the_top_p_mass() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)

    def draw(temperature: float, top_p: float) -> int:
        return nucleus_sample(logits[None], [temperature], [top_p], [generator])[0]

    assert {draw(1.0, 0.7) for _ in range(200)} == {0, 1}  # 0.5 + 0.3 reach 0.7: the rest never
    assert {draw(1.0, 0.01) for _ in range(50)} == {0}  # the likeliest always stays
    assert draw(0.0, 1.0) == 0  # temperature 0: greedy
    counts = Counter(draw(1.0, 1.0) for _ in range(4000))
    frequencies = [counts[token] / 4000 for token in range(4)]
    assert all(abs(f - p) < 0.03 for f, p in zip(frequencies, [0.5, 0.3, 0.15, 0.05], strict=True)), frequencies


def test_rows_sampled_together_draw_as_they_would_alone() -> None:
    """One pass for the batch, each row with its own settings and its own generator's stream."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    settings = [(0.0, 1.0), (1.0, 0.9), (0.7, 1.0), (1.5, 0.5)]

    def streams(rows: list[int]) -> list[list[int]]:
        generators = [torch.Generator().manual_seed(row) for row in rows]
        draws = [[] for _ in rows]
        for _ in range(30):
            tokens = nucleus_sample(
                logits[rows], [settings[r][0] for r in rows], [settings[r][1] for r in rows], generators
            )
            for row_draws, token in zip(draws, tokens, strict=True):
                row_draws.append(token)
        return draws

    together = streams([0, 1, 2, 3])
    assert together == [streams([row])[0] for row in range(4)]
    assert set(together[0]) == {int(logits[0].argmax())} and len(set(together[2])) > 1
    assert nucleus_sample(logits[[]], [], [], []) == []


def test_streamed_deltas_add_up_to_the_text() -> None:
    delta = TextDelta()
    assert [delta("Ein"), delta("Ein Hund"), delta("Ein Hund rennt")] == ["Ein", " Hund", " rennt"]
    assert delta("Eine") == ""  # re-spaced earlier text: nothing new is sent


def test_the_served_predict_continues_each_text(tiny) -> None:
    model, tokenizer, _ = tiny
    answers = GENERATION.predict(model, tokenizer, ["the film", "x " * 80], 64)
    assert [answer["truncated"] for answer in answers] == [False, True]
    assert all(isinstance(answer["generated"], str) for answer in answers)


def test_a_generation_task_needs_no_label_column_and_empty_texts_are_refused(tmp_path: Path) -> None:
    source = {"type": "file", "path": str(tmp_path / "x.jsonl"), "text_column": "review"}
    task = TaskConfig(type="generation", train=source, validation=source, test=source)
    assert task.train.label_column == "review"
    classify = TaskConfig(train=source, validation=source, test=source)
    assert classify.train.label_column == "label"
    with pytest.raises(ValueError, match="row 2 of the train split has an empty text"):
        GENERATION.check_rows(pa.table({"text": ["a", " "], "label": ["a", " "]}), "train")


def test_rows_that_leave_and_join_a_running_decoding_decode_as_they_would_alone(tiny) -> None:
    """Continuous batching: a row that ends is dropped between steps and a new one, with its prompt
    read apart, joins with its cache left-padded; every row's greedy text stays its own."""
    model, tokenizer, _ = tiny
    short, long_, late = (prompt_ids(tokenizer, text) for text in ("the film", "a dull and tedious plot", "the cast"))

    def alone(ids: list[int], budget: int) -> list[int]:
        return Decoding(model, tokenizer, [Ask(ids, budget, temperature=0.0)]).run()[0].ids

    running = Decoding(model, tokenizer, [Ask(short, 2, temperature=0.0), Ask(long_, 12, temperature=0.0)])
    running.step()
    running.step()
    assert running.rows[0].finish_reason is not None and running.rows[1].finish_reason is None
    first = running.rows[0]
    running.keep([1])
    joining = Decoding(model, tokenizer, [Ask(late, 9, temperature=0.0)])
    joining.step()
    running.absorb(joining)
    rows = running.run()
    assert first.ids == alone(short, 2)[: len(first.ids)]
    assert rows[0].ids == alone(long_, 12) and rows[1].ids == alone(late, 9)


@pytest.mark.parametrize("where", ["thread", "process"])
def test_requests_arriving_while_a_batch_runs_join_it_and_each_gets_its_own_events(tiny, where: str) -> None:
    """The replica's decoder, on a thread of its own or in a child process: asks sent while a batch
    runs join it, a stream's tokens add up to its text, greedy text is the one decoded alone, and a
    caller that stops reading ends its row."""
    import asyncio

    from components.decoder import Decoder

    model, tokenizer, _ = tiny
    decoder = Decoder(model, tokenizer, threads=1, max_batch_size=8, wait_s=0.0, where=where)
    ids = prompt_ids(tokenizer, "the film")

    async def collect(ask: Ask, whole: bool = False) -> list[dict]:
        return [event async for event in decoder.events(ask, whole=whole)]

    async def together():
        first = asyncio.create_task(collect(Ask(ids, 30, temperature=0.0)))
        while not decoder.batch_sizes:
            await asyncio.sleep(0.001)  # the first batch runs
        rest = [asyncio.create_task(collect(Ask(ids, 4 + i, temperature=1.0, seed=i), whole=i == 0)) for i in range(3)]
        return await first, await asyncio.gather(*rest)

    async def leave_early() -> list[int]:
        """Rows per step of an ask sent right after a client left its (long) stream."""
        stream = decoder.events(Ask(ids, model.config.n_positions - len(ids), temperature=1.0, seed=0))
        await anext(stream)
        await stream.aclose()  # the client went away: its row is cancelled
        size = len(decoder.batch_sizes)
        await collect(Ask(ids, 6, temperature=0.0))
        return list(decoder.batch_sizes)[size:]

    try:
        first, rest = asyncio.run(together())
        assert first[-1]["text"] == Decoding(model, tokenizer, [Ask(ids, 30, temperature=0.0)]).run()[0].text
        assert max(decoder.batch_sizes) > 1  # the later asks joined the running batch
        assert len(rest[0]) == 1  # whole: the last event only
        for events, budget in [(first, 30), *zip(rest, (4, 5, 6), strict=True)]:
            assert events[-1]["finish_reason"] in (LENGTH, STOP) and events[-1]["tokens"] <= budget
            assert "".join(event["token"] for event in events) == events[-1]["text"]
        # The row left behind ends within a step or two, so the next ask (at least 4 steps, as
        # decoded alone) ends alone; had the row gone on, every step would hold two.
        assert len(Decoding(model, tokenizer, [Ask(ids, 6, temperature=0.0)]).run()[0].ids) >= 4
        assert asyncio.run(leave_early())[-1] == 1
    finally:
        decoder.close()
    assert not decoder.readers


def test_every_decoding_step_runs_on_the_one_decoding_thread(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread decoder's reads of prompts and steps, for requests that come one after another and
    together, all run on one thread, not the event loop's: torch ran each step 1.4x slower hopping
    between a pool's threads."""
    import asyncio
    import threading

    from components.decoder import Decoder

    model, tokenizer, _ = tiny
    threads: set[int] = set()
    step = Decoding.step

    def recorded(decoding: Decoding):
        threads.add(threading.get_ident())
        return step(decoding)

    monkeypatch.setattr(Decoding, "step", recorded)
    decoder = Decoder(model, tokenizer, threads=1, max_batch_size=4, wait_s=0.0, where="thread")
    ids = prompt_ids(tokenizer, "the film")

    async def scenario():
        async def ask(budget: int) -> dict:
            return [event async for event in decoder.events(Ask(ids, budget, temperature=0.0))][-1]

        first = asyncio.create_task(ask(12))
        await asyncio.sleep(0)
        together = await asyncio.gather(*(ask(3 + i) for i in range(6)))
        return [await first, *together, await ask(2)], threading.get_ident()

    try:
        answers, event_loop = asyncio.run(scenario())
    finally:
        decoder.close()
    assert all(answer["finish_reason"] in (LENGTH, STOP) for answer in answers)
    assert max(decoder.batch_sizes) > 1  # some requests were decoded together
    assert len(threads) == 1 and event_loop not in threads


def test_a_generation_model_has_no_attention_map_yet(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """/explain answers 404 rather than a classifier's map of its logits; `ptft explain` exits 2
    naming the model (it raised a TypeError from calling the missing map)."""
    from pipelines.cli import main

    assert GENERATION.explain is None
    model, tokenizer, _ = tiny
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["explain", str(tmp_path / "model"), "the film was"]) == 2
    err = capsys.readouterr().err
    assert "MODEL = " in err and "a generation model has no attention map yet" in err, err


def test_a_killed_decoding_process_fails_its_requests_and_another_starts_at_once(tiny) -> None:
    """A child process killed mid-answer: its requests fail with a message (the replica answers
    503), and another child starts without waiting for a request, which it then answers."""
    import asyncio
    import signal

    from components.decoder import Decoder, DecoderLost

    model, tokenizer, _ = tiny
    decoder = Decoder(model, tokenizer, threads=1, max_batch_size=8, wait_s=0.0)
    ids = prompt_ids(tokenizer, "the film")

    async def killed_mid_answer():
        longest = model.config.n_positions - len(ids)  # ~150 ms of steps: the kill comes first
        stream = decoder.events(Ask(ids, longest, temperature=1.0, seed=0))
        first = asyncio.ensure_future(anext(stream))
        while not decoder.readers:
            await asyncio.sleep(0.001)  # the ask is sent
        decoder.child.send_signal(signal.SIGKILL)
        with pytest.raises(DecoderLost, match="decoding process exited"):
            await first
            async for _ in stream:
                pass
        while not (decoder._running() and decoder.child.pid != old):  # no request asked for it
            await asyncio.sleep(0.05)
        return [event async for event in decoder.events(Ask(ids, 3, temperature=0.0), whole=True)]

    try:
        old = decoder.child.pid
        after = asyncio.run(asyncio.wait_for(killed_mid_answer(), timeout=120))
        assert after[-1]["finish_reason"] in (LENGTH, STOP) and decoder.child.pid != old
    finally:
        decoder.close()


def test_a_decoder_that_does_not_start_backs_off_and_requests_fail_at_once_meanwhile(tiny, monkeypatch) -> None:
    """The decoding loop ends and its model no longer loads: after the failed restart, requests fail
    at once saying when to retry, without loading it again each; past the back-off one start is
    tried (failing again doubles the wait), and once it starts, requests are answered."""
    import asyncio

    from components import decoder as decoding
    from components.decoder import Decoder, DecoderLost

    monkeypatch.setattr(decoding, "FIRST_BACKOFF_S", 1.5)  # wide enough for five requests on a loaded machine
    model, tokenizer, _ = tiny
    decoder = Decoder(model, tokenizer, threads=1, max_batch_size=8, wait_s=0.0, where="thread")
    ids = prompt_ids(tokenizer, "the film")
    starts, start = [], decoder._start
    loads = {"fail": True}

    def start_counted():
        starts.append(time.monotonic())
        if loads["fail"]:
            raise RuntimeError("the decoding thread exited (None) while loading the model")
        start()

    monkeypatch.setattr(decoder, "_start", start_counted)

    async def answer():
        return [event async for event in decoder.events(Ask(ids, 2, temperature=0.0), whole=True)]

    async def scenario():
        await answer()  # listening
        decoder.outbox.close()  # the loop ends at the end of its input: gone, as a crash
        while not starts:
            await asyncio.sleep(0.01)  # the restart, unasked, fails
        while decoder.restarting is not None and not decoder.restarting.done():
            await asyncio.sleep(0.01)
        for _ in range(5):
            with pytest.raises(DecoderLost, match=r"did not start .*; the next start is in \d+ s: retry then"):
                await answer()
        assert len(starts) == 1  # five requests, no load tried
        await asyncio.sleep(1.7)
        with pytest.raises(DecoderLost, match="the next start is in 3 s"):  # tried once more: the wait doubled
            await answer()
        assert len(starts) == 2
        loads["fail"] = False
        await asyncio.sleep(3.2)
        return await answer()

    try:
        answered = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
        assert answered[-1]["finish_reason"] in (LENGTH, STOP) and len(starts) == 3
        assert decoder.failed_starts == 0
    finally:
        decoder.close()


def test_the_decoding_loop_ends_a_cancelled_row_and_never_starts_a_cancelled_ask(tiny) -> None:
    """The decoding loop over real pipes, its steps let through one at a time: a cancelled running
    row ends at the next step (finish_reason deadline), a cancelled waiting ask never runs, and the
    loop returns once the replica closes its end."""
    import threading
    from multiprocessing import Pipe

    from components.decoder import Requests, decode_forever

    model, tokenizer, _ = tiny
    steps = threading.Semaphore(0)

    def gated(**inputs):
        assert steps.acquire(timeout=60), "no step let through"
        return model(**inputs)

    ids = prompt_ids(tokenizer, "the film")
    to_child, child_in = Pipe()
    child_out, from_child = Pipe()
    requests = Requests(child_in)
    loop = threading.Thread(target=decode_forever, args=(gated, tokenizer, 1, 0.0, requests, child_out), daemon=True)
    loop.start()
    to_child.send(("ask", 1, Ask(ids, 40, temperature=1.0, seed=3), False))
    steps.release()
    kind, size, events = from_child.recv()
    assert kind == "step" and size == 1 and [request for request, _ in events] == [1]
    to_child.send(("ask", 2, Ask(ids, 5, temperature=0.0), True))  # waits: the batch holds one row
    to_child.send(("cancel", 2))
    to_child.send(("cancel", 1))
    ended, taken = None, 1
    while ended is None:
        steps.release()
        kind, _, events = from_child.recv()
        taken += 1
        assert kind == "step" and all(request == 1 for request, _ in events), events  # ask 2 never ran
        ended = next((event for _, event in events if "finish_reason" in event), None)
    assert ended["finish_reason"] == DEADLINE and taken <= 3  # the step running at the cancel, then the next
    to_child.close()
    loop.join(timeout=10)
    assert not loop.is_alive() and not requests.live
