"""Pictures drawn side by side: task branches run on threads of one driver, and two sweeps that
end together draw at once (matplotlib's pyplot is not thread-safe: components/plots.pyplot)."""

from __future__ import annotations

import threading
from pathlib import Path

from components import plots, sweep_report


def test_sweep_plots_and_confusion_matrices_drawn_on_many_threads_all_come_out(tmp_path: Path) -> None:
    rows = [
        {"trial": f"t{index}", "status": "completed", "metric": 0.5 + index / 100, "config": {"learning_rate": lr}}
        for index, lr in enumerate((1e-4, 3e-4, 1e-3, 3e-3))
    ]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def draw(worker: int) -> None:
        start.wait()
        try:
            for round_ in range(6):
                sweep_report.plot(
                    rows, ["learning_rate"], "eval/f1", {"learning_rate"}, "t2", tmp_path / f"s{worker}-{round_}.png"
                )
                plots.confusion_matrix(
                    [[3, 1], [0, 4]], ["neg", "pos"], tmp_path / f"c{worker}-{round_}.png", title="t"
                )
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=draw, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    pictures = sorted(tmp_path.glob("*.png"))
    assert len(pictures) == 48
    assert all(picture.read_bytes().startswith(b"\x89PNG") for picture in pictures)
