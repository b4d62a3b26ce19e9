"""sockscope: TCP socket states, queues and listen backlogs per port, from sock_diag."""

__version__ = "0.1.0"
