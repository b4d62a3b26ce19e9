"""sockscope: TCP socket states, queues and listen backlogs per port, from sock_diag."""

import os as _os

__version__ = "0.1.0"

# numpy's OpenBLAS starts one thread per CPU when numpy is imported, for linear algebra
# sockscope never does: 63 idle threads on a 64-CPU host, past the unit's TasksMax=64.
# Set before any module of the package imports numpy; an operator's setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")
del _var
