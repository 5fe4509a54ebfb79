def apply_rope(*a, **k): raise NotImplementedError
