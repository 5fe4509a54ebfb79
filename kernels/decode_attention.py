def decode_attention(*a, **k): raise NotImplementedError
