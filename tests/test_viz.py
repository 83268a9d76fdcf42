"""Plots whose geometry carries meaning."""

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from diffusion_course import viz  # noqa: E402


def test_smoothed_loss_runs_through_a_straight_raw_curve():
    """For a loss falling in a straight line, the moving average at each point equals the raw loss
    there: it is drawn at the middle of its window, not at the end (where it would float above)."""
    losses = np.linspace(2.0, 1.0, 101)
    fig = viz.plot_losses(losses, window=10)
    raw, smooth = fig.axes[0].lines[:2]
    x, y = smooth.get_data()
    np.testing.assert_allclose(y, np.interp(x, *raw.get_data()), rtol=1e-12)
    assert len(x) == 101 - 10 + 1
