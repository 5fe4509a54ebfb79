import os

# Triton reads this when it is first imported: run its kernels on CPU tensors through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
