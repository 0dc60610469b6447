"""What the training log says per validation: epoch, step, loss, val SSR/PA and an ETA."""
from nearid.training.loop import progress_line


def test_progress_line_has_epoch_step_loss_val_and_eta():
    m = {"epoch": 6, "step": 100, "loss": 3.0612, "val_ssr": 12.24, "val_pa": 47.81}
    # 100 steps in 25 s -> 420 steps left at 0.25 s/step = 105 s
    assert progress_line(m, 40, 520, 25.0, 100) == "epoch 7/40 step 100/520 loss 3.061 val SSR 12.2 PA 47.8, eta 1m45s"
    # resumed at step 80: the pace counts only this run's 20 steps (10 s -> 0.5 s/step, 210 s left)
    assert progress_line(m, 40, 520, 10.0, 20).endswith("eta 3m30s")
    assert progress_line({"epoch": 0, "step": 5, "loss": 1.0}, 2, 10, 0.0, 0) == "epoch 1/2 step 5/10 loss 1.000"
    assert progress_line(m, 40, 100_000, 25.0, 100).endswith("eta 6h56m")
