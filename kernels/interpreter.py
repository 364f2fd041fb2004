"""Whether the Triton interpreter (TRITON_INTERPRET=1, how the kernels run on a CPU) can run these kernels here.

The attention kernels loop up to a bound loaded from memory (a row's key count). Under the interpreter
every scalar is a 1-element numpy array, and Triton before 3.7 turns a loop bound into a Python int with
`int(array)`; numpy 2.4 refuses that for arrays of one or more dimensions. Seen with Triton 3.6.0 and
numpy 2.4.6: `TypeError: only 0-dimensional arrays can be converted to Python scalars` from inside the
kernel. Compiled kernels on a GPU are not affected.
"""

from __future__ import annotations

import warnings

import numpy as np
import triton

FIXED_IN = (3, 7)  # Triton 3.7's interpreter squeezes the array first


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


def _numpy_refuses_int_of_array() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 1.25-2.3 warn before refusing in 2.4
        try:
            int(np.ones(1))
        except TypeError:
            return True
    return False


def interpreter_problem() -> str | None:
    """Why the installed Triton interpreter cannot run this package's kernels, or None when it can."""
    if _version(triton.__version__) >= FIXED_IN or not _numpy_refuses_int_of_array():
        return None
    return (
        f"the Triton {triton.__version__} interpreter cannot run these kernels with numpy {np.__version__}: it "
        "converts loop bounds with int() on 1-element arrays, which numpy 2.4 refuses; "
        "install triton>=3.7 or numpy<2.4 to run them interpreted on a CPU"
    )
