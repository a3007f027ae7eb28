"""A pickle reader for data-only files such as nanoGPT's meta.pkl: plain containers, strings,
numbers, bool and None load; any global (a class, a function such as os.system) is refused."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from gptdeploy.errors import SourceError


class _Refused(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _DataOnlyUnpickler(pickle.Unpickler):
    # Every way a pickle can call code goes through a global (GLOBAL / STACK_GLOBAL opcodes feed
    # REDUCE, BUILD, NEWOBJ, INST, OBJ), so refusing all of them leaves only literal data.
    def find_class(self, module: str, name: str):
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {pid!r}")


def load_data_pickle(path: Path):
    """Load `path` if it holds only plain data; SourceError otherwise (nothing in it runs)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"{path} cannot be read: {exc}") from None
    try:
        return _DataOnlyUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise SourceError(
            f"{path} refused: it references {exc.name}, which could execute code; "
            "a vocabulary file should hold only plain data (rebuild it, or pass --tokenizer)"
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        MemoryError,
        UnicodeDecodeError,
    ) as exc:
        raise SourceError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc})") from None
