def swiglu(*a, **k): raise NotImplementedError
