"""The choices tada_kernels' ops accept, importable without torch or triton (configs validate against them)."""

BACKENDS = ("auto", "eager", "triton")
ATTENTION_FORMS = ("paper", "uncertainty")  # w = 1 - H(d) (eq. 3 as written), or H(d) / ln 2
ENTROPY_UNITS = ("nats", "bits")
