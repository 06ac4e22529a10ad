"""posleak: where does absolute position come from in a decoder told only relative offsets?"""
