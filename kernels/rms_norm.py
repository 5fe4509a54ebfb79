def rms_norm(*a, **k): raise NotImplementedError
