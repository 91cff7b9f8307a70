"""The two checks every lesson script uses: print what is compared, and stop at the first mismatch.

    check(name, got, expected, tol)   numbers or tensors: max |got - expected| <= tol, compared in float64
    check_equal(name, got, expected)  exact equality (counts, shapes, lists)

A lesson script imports them with
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
    from checks import check, check_equal
"""

import torch


def check(name, got, expected, tol=0.0):
    """Print one check; raise AssertionError when max |got - expected| > tol."""
    got = torch.as_tensor(got, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    err = (got - expected).abs().max().item()
    print(f"  [{'ok' if err <= tol else 'FAIL'}] {name}   (max |diff| {err:.1e}, tol {tol:.0e})")
    assert err <= tol, f"{name}: max |diff| {err:.3e} exceeds {tol:.1e} (got {got.tolist()}, expected {expected.tolist()})"


def _shown(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value}"


def check_equal(name, got, expected):
    """Exact equality (integers are printed with thousands separators)."""
    ok = got == expected
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: {_shown(got)}" + ("" if ok else f" != {_shown(expected)}"))
    assert ok, f"{name}: got {_shown(got)}, expected {_shown(expected)}"
