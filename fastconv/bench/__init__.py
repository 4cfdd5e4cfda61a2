"""The benchmark behind ``python -m fastconv bench``.

It times every method usable here (``fastconv.methods``, CPU and GPU), ``method="auto"``, and
the peers of `fastconv.bench.peers` (a NumPy im2col reference in the style of "Deep Learning from
Scratch", scipy.signal loops on small shapes, PyTorch when installed) on the shape suite of
DESIGN.md section 4, for conv2d forward and backward, max-pool forward and backward, global
average pooling, transposed convolution and (with ``--ops``) the conv suite in channels-last. Each
result is checked against the NumPy reference computed in float64, and one table shows the
median time, the rate (GFLOP/s for convolutions, GB/s of memory traffic for max-pool), the
speed-up over the NumPy reference and over PyTorch, and the relative max error.

How the numbers are taken:

- inputs are made once per problem, outside the timed region (seeded, standard normal);
- each method runs once to compile (Numba, CUDA) and touch its buffers, a second time to
  estimate its duration, then ``ceil(budget / estimate)`` times (at least 3, at most 100, or
  ``--repeat``); the median is reported. When that second call takes over 2 s (0.5 s with
  ``--quick``), it is the one time reported;
- the garbage collector is off while timing; GPU calls end with ``cuda.synchronize()``; GPU
  methods are timed twice, on device arrays (``gpu``) and on host arrays with the transfers
  (``gpu+copy``);
- thread pools of other libraries keep spinning for a while after a call and slow the next
  library down many times over, so the runner pauses (``--pause``, 0.3 s) between two methods,
  and PyTorch runs in a separate worker process (``python -m fastconv.bench.worker``) that
  draws the same inputs from the same seeds;
- PyTorch's backward is ``torch.ops.aten.convolution_backward`` (its backward kernels alone),
  not autograd, which would also re-run the forward.

The rooms: `suite` (the shapes, problems, references and peer calls), `timing`, `worker` (the
PyTorch process), `runner` (what to time and the run), `report` (tables, chart, saved runs),
`nets` (whole training steps), `peers` (NumPy, SciPy and PyTorch implementations) and `cli`
(``python -m fastconv bench``).
"""

from .cli import add_arguments, main
from .report import format_auto, format_markdown, format_text, load_results, plot
from .runner import (CONTENDERS, Entry, Result, auto_report, entries_for, policy_entries, run,
                     save_policy)
from .suite import (BOX_SHAPES, CONV_SHAPES, DEFAULT_OPS, HELDOUT_SHAPES, OPS, PEERS, POOL_SHAPES, QUICK_SHAPES, SHAPES,
                    TRANSPOSE_SHAPES, Problem, max_error, peer_call, select_shapes)
from .timing import SLOW_CALL, measure, measure_together

__all__ = ["BOX_SHAPES", "CONTENDERS", "CONV_SHAPES", "DEFAULT_OPS", "Entry", "HELDOUT_SHAPES", "OPS", "PEERS",
           "POOL_SHAPES", "Problem", "QUICK_SHAPES", "Result", "SHAPES", "SLOW_CALL",
           "add_arguments", "auto_report", "entries_for", "format_auto", "format_markdown",
           "format_text", "load_results", "main", "max_error", "measure", "measure_together",
           "peer_call", "plot", "policy_entries", "run", "save_policy", "select_shapes", "TRANSPOSE_SHAPES"]
